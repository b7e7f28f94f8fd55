#include "duplex/version.hpp"

namespace duplex {

const char* library_version() noexcept { return DUPLEX_VERSION_STRING; }

}  // namespace duplex
