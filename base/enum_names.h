// One table per enum: its values and their names, read both ways. The first
// entry for a value is its name; later entries for the same value are aliases
// that parse but are never written.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"

namespace metatt {

template <typename E>
struct EnumName {
  E value;
  const char* name;
};

// The name of `value` in `table`, or `unknown` when the table lacks it.
template <typename E, std::size_t N>
const char* NameOf(const EnumName<E> (&table)[N], E value, const char* unknown) {
  for (const auto& e : table)
    if (e.value == value) return e.name;
  return unknown;
}

// The value named `name` in `table` (exact match), or nullopt.
template <typename E, std::size_t N>
std::optional<E> ValueOf(const EnumName<E> (&table)[N], std::string_view name) {
  for (const auto& e : table)
    if (name == e.name) return e.value;
  return std::nullopt;
}

// The same, ignoring ASCII case.
template <typename E, std::size_t N>
std::optional<E> ValueOfIgnoringCase(const EnumName<E> (&table)[N], absl::string_view name) {
  for (const auto& e : table)
    if (absl::EqualsIgnoreCase(name, e.name)) return e.value;
  return std::nullopt;
}

}  // namespace metatt
