#include "adapters/adapter.h"

namespace metatt {

const char* ProjectionName(Projection p) {
  switch (p) {
    case Projection::kQuery: return "q";
    case Projection::kKey: return "k";
    case Projection::kValue: return "v";
    case Projection::kAttnOutput: return "o";
    case Projection::kFfnUp: return "ffn_up";
    case Projection::kFfnDown: return "ffn_down";
  }
  return "?";
}

}  // namespace metatt
