// Facts about the build, for `bertfast info`.
#pragma once

#include <string>

namespace bertfast {
int runtime_version();
std::string compiled_archs();
}  // namespace bertfast
