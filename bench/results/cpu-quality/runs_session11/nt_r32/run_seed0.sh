set -x
cd /work/main
COMMON="--model_dir=/work/main/models/all-MiniLM-L6-v2 --device=auto --glue_dir=/work/shared/data/glue --epochs=3.0 --batch_size=16 --max_length=64 --train_limit=2000 --max_eval=500 --pooling=mean --seed=0 --warmup_ratio=0.06 --log_every=50"
[ -f bench/results/cpu-quality/runs_session11/nt_r32/seed0/base_without_STS-B/result.json ] || OMP_NUM_THREADS=1 nice -n 5 /tmp/qb10/server/training/metatt-train $COMMON --steps=1200 --task=RTE,CoLA,MRPC,SST-2 --form=4+1d --rank=32 --projections=q,k,v,o --out=bench/results/cpu-quality/runs_session11/nt_r32/seed0/base_without_STS-B
OMP_NUM_THREADS=1 nice -n 5 /tmp/qb10/server/training/metatt-train $COMMON --steps=300 --task=STS-B --base_family=bench/results/cpu-quality/runs_session11/nt_r32/seed0/base_without_STS-B --out=bench/results/cpu-quality/runs_session11/nt_r32/seed0/STS-B
