// Output helpers for metattctl: aligned tables, progress bars, durations.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace metatt::ctl {

// Prints rows under a header with columns padded to their widest cell.
void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows);

// "[#########.........]" of `width` cells for done/total.
std::string Bar(double done, double total, int width = 30);
// "1h02m", "3m05s", "12s".
std::string Duration(double seconds);
// "1.5 MiB".
std::string Bytes(int64_t n);
// Shortest readable form of a double ("0.8123", "12.5").
std::string Num(double v, int precision = 4);
// Local time of a unix-ms timestamp, "2025-11-25 21:03:04".
std::string Time(int64_t unix_ms);

}  // namespace metatt::ctl
