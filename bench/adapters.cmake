# Adapter throughput benchmark (not a test). Include from bench/CMakeLists.txt.
metatt_cc_binary(NAME adapter_bench SRCS ${CMAKE_CURRENT_LIST_DIR}/adapter_bench.cc
  DEPS metatt_adapters metatt_model absl::flags absl::flags_parse nlohmann_json::nlohmann_json)
