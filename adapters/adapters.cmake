# MetaTT + LoRA adapter library (no gRPC; I/O limited to safetensors + JSON).
# Layering: depends on metatt_adapters_util only (never on server/model).
metatt_cc_library(NAME metatt_adapters
  SRCS metatt_config.cc tensor_train.cc tt_sweep.cc metatt_adapter.cc lora_adapter.cc
       family_io.cc
  DEPS metatt_adapters_util metatt_torch absl::status absl::statusor absl::strings
       nlohmann_json::nlohmann_json)

foreach(t metatt_config_test metatt_adapter_test tt_sweep_test lora_adapter_test family_io_test)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${t}.cc)
    metatt_cc_test(NAME ${t} SRCS ${t}.cc DEPS metatt_adapters LABELS unit TIMEOUT 60)
  endif()
endforeach()
# Tests against the real encoder seam (tests may depend on server/model).
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/adapter_encoder_test.cc)
metatt_cc_test(NAME adapter_encoder_test SRCS adapter_encoder_test.cc
  DEPS metatt_adapters metatt_model LABELS unit TIMEOUT 60)
endif()

# Loads a base model + a PEFT LoRA adapter and writes hidden states
# (driven by tests/python/test_lora_peft_parity.py).
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/lora_tool.cc)
metatt_cc_binary(NAME metatt-lora-forward SRCS lora_tool.cc
  DEPS metatt_adapters metatt_model absl::flags absl::flags_parse)
endif()
