"""Python client for the MetaTT fine-tuning service.

    from metatt_client import Client
    c = Client("127.0.0.1:50051")
    ds = c.upload("train.tsv", name="mrpc", text_column="3", text_pair_column="4",
                  label_column="0", has_header=True)
    job = c.submit(family="glue", task="mrpc", dataset_id=ds.id, max_steps=100)
    for event in c.follow(job.id):
        print(event)
    print(c.predict("glue", "mrpc", [("A man eats.", "Someone is eating.")]))

Stubs are generated from proto/ by grpcio-tools at build time
(scripts/setup.sh runs `python -m metatt_client.codegen`); they are not
committed.
"""
from .client import Client, MetattError  # noqa: F401
