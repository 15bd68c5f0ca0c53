// The input and output of a JSONL tool (metatt-tokenize, metatt-bpe-tokenize):
// a file each, or "-" for stdin / stdout, and the tool's start (its
// tokenizer made, the streams open). Header-only, torch-free.
#pragma once

#include <fstream>
#include <iostream>
#include <string>

#include "absl/status/statusor.h"

namespace metatt {

class JsonlStreams {
 public:
  // False, with "<tool>: cannot open <file>" on stderr, when a file does not open.
  bool Open(const char* tool, const std::string& input, const std::string& output) {
    if (input != "-") {
      in_file_.open(input, std::ios::binary);
      if (!in_file_) return CannotOpen(tool, input);
      in_ = &in_file_;
    }
    if (output != "-") {
      out_file_.open(output, std::ios::binary);
      if (!out_file_) return CannotOpen(tool, output);
      out_ = &out_file_;
    }
    return true;
  }
  // A tool's start: unsynchronised stdio, then `made` (the tool's tokenizer;
  // "<tool>: <status>" on stderr when it failed), then Open(). False when
  // either failed (the tool exits 1).
  template <typename T>
  bool Start(const char* tool, const absl::StatusOr<T>& made, const std::string& input,
             const std::string& output) {
    std::ios::sync_with_stdio(false);
    if (!made.ok()) {
      std::cerr << tool << ": " << made.status() << "\n";
      return false;
    }
    return Open(tool, input, output);
  }
  std::istream& in() { return *in_; }
  std::ostream& out() { return *out_; }
  // The exit status: 0 when everything written reached the output.
  int Finish() {
    out_->flush();
    return out_->good() ? 0 : 1;
  }

 private:
  static bool CannotOpen(const char* tool, const std::string& file) {
    std::cerr << tool << ": cannot open " << file << "\n";
    return false;
  }

  std::ifstream in_file_;
  std::ofstream out_file_;
  std::istream* in_ = &std::cin;
  std::ostream* out_ = &std::cout;
};

}  // namespace metatt
