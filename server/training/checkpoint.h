// Resumable training checkpoints: a Trainer's whole state in one
// safetensors file, written atomically (scratch file, fsync, rename, fsync
// of the directory: base/file_io.h), so that a restored trainer continues
// bit-identically on the CPU.
//
// What a checkpoint holds (Trainer::SaveState / RestoreState, defined in
// checkpoint.cc): the adapter's tensors (AdapterBinding::snapshot), every
// task head, AdamW's state per optimised parameter (exp_avg, exp_avg_sq,
// step; in the optimizer's parameter order), the data order and cursor, the
// shuffling RNG's state, the step (the LR schedule is a function of it), the
// DMRG schedule position, the best evaluation and its tensors, the last
// evaluation, the loss history, examples and tokens seen. Tensors live under
// "adapter.", "heads.", "best.", "opt.<i>.", "order", "losses"; the scalars
// are one JSON document in the file's metadata ("metatt.trainer_state"), with
// a "summary" (step, total steps, time, metrics at that step) that listing
// reads without loading the tensors.
//
// Restoring needs a trainer built exactly as the saved one was (same
// options, tasks and data, an adapter of the same form and seed): it checks
// the step count, train-pool size and batch size, and every tensor's name
// and shape, and refuses a mismatch (FAILED_PRECONDITION naming it). A
// checkpoint taken after a DMRG sweep is restored by replaying the sweeps on
// the fresh adapter first (same max ranks), then overwriting its tensors;
// with a relative cutoff that gives other ranks the shapes differ and the
// restore is refused.
//
// A job's checkpoints: <dir>/step-<K>.ckpt (K zero-padded), newest kept,
// older ones pruned after each write.
//
// Size: the adapter's whole snapshot is written (twice once a best
// evaluation exists), frozen tensors included. For an add-task job on a
// large family that is O(family size) per checkpoint; writing only the
// trainable tensors (and taking the frozen ones from the family version on
// restore) is not done yet.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/training/trainer.h"

namespace metatt {

struct TrainerCheckpointInfo {
  std::string path;
  int64_t step = 0;
  int64_t total_steps = 0;
  int64_t time_unix_ms = 0;
  // "loss" (the step's training loss), and when an evaluation ran at that
  // step "<task>/<metric>" and "score".
  std::map<std::string, double> metrics;
};

// Writes `trainer`'s state to <dir>/step-<K>.ckpt (creating `dir`), then
// removes all but the newest `keep` (>= 1) checkpoints in `dir`.
absl::StatusOr<TrainerCheckpointInfo> WriteTrainerCheckpoint(const std::string& dir,
                                                             const Trainer& trainer, int keep = 2);

// The checkpoints in `dir`, oldest first; empty (not an error) when `dir`
// does not exist. Reads only each file's header.
absl::StatusOr<std::vector<TrainerCheckpointInfo>> ListTrainerCheckpoints(const std::string& dir);

// The newest readable checkpoint in `dir`, if any.
std::optional<TrainerCheckpointInfo> LatestTrainerCheckpoint(const std::string& dir);

}  // namespace metatt
