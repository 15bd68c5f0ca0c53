// Conversions between the wire messages (metatt.v1) and the plain structs of
// server/jobs and server/runtime. Zero / empty proto fields take the
// defaults of the plain structs.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "metatt/v1/adapters.pb.h"
#include "metatt/v1/datasets.pb.h"
#include "metatt/v1/inference.pb.h"
#include "metatt/v1/jobs.pb.h"
#include "server/runtime/generator_api.h"
#include "server/runtime/predictor_api.h"
#include "server/jobs/dataset_manager.h"
#include "server/store/job_types.h"
#include "server/store/store.h"

namespace metatt {

v1::JobState ToProto(JobState s);
// JOB_STATE_UNSPECIFIED -> nullopt (no filter).
absl::StatusOr<std::optional<JobState>> FromProto(v1::JobState s);

absl::StatusOr<JobSpec> FromProto(const v1::JobSpec& spec);
void ToProto(const JobSpec& spec, v1::JobSpec* out);
void ToProto(const JobRecord& job, v1::Job* out);
void ToProto(const std::string& job_id, int64_t sequence, const JobEvent& e, v1::JobEvent* out);

// Header -> DatasetUpload with its spec_json (keys = DatasetHeader field names).
absl::StatusOr<DatasetUpload> FromProto(const v1::DatasetHeader& header);
void ToProto(const DatasetRecord& d, v1::Dataset* out);

void ToProto(const TaskRecord& t, v1::Task* out);
void ToProto(const FamilyVersionRecord& f, v1::FamilyVersion* out);

absl::StatusOr<PredictInput> FromProto(const v1::PredictInput& in, int index);
void ToProto(const PredictOutput& o, v1::Prediction* out);

// Field-shape checks only (the generator validates values and limits).
absl::StatusOr<GenerateParams> FromProto(const v1::GenerateRequest& req);
void ToProto(const GenerateChunk& c, v1::GenerateChunk* out);

}  // namespace metatt
