#include "duplex/error.hpp"

#include <set>
#include <string>

#include "support.hpp"

namespace duplex {
namespace {

constexpr errc all_codes[] = {
    errc::peer_closed,
    errc::message_too_large,
    errc::truncated_message,
    errc::buffer_too_small,
    errc::fds_truncated,
    errc::too_many_fds,
    errc::protocol_error,
    errc::broken,
    errc::would_block,
    errc::timed_out,
    errc::not_supported,
    errc::wrong_kind,
    errc::closed,
    errc::not_inherited,
    errc::queue_full,
    errc::bad_environment,
    errc::reentrant_call,
    errc::authentication_failed,
};

TEST(error, CategoryIsNamedDuplex) { EXPECT_STREQ(error_category().name(), "duplex"); }

TEST(error, EveryCodeHasADistinctMessageAndName) {
  std::set<std::string> messages;
  std::set<std::string_view> names;
  for (errc e : all_codes) {
    const std::error_code ec = e;  // implicit through is_error_code_enum
    EXPECT_EQ(&ec.category(), &error_category());
    EXPECT_FALSE(ec.message().empty());
    EXPECT_EQ(ec.message().find("unknown"), std::string::npos) << to_string(e);
    messages.insert(ec.message());
    names.insert(to_string(e));
  }
  EXPECT_EQ(messages.size(), std::size(all_codes));
  EXPECT_EQ(names.size(), std::size(all_codes));
}

TEST(error, CodesCompareWithTheEnumDirectly) {
  const std::error_code ec = make_error_code(errc::peer_closed);
  EXPECT_TRUE(ec == errc::peer_closed);
  EXPECT_FALSE(ec == errc::protocol_error);
  EXPECT_TRUE(ec);  // an error is truthy
}

TEST(error, PortableConditionsMatch) {
  EXPECT_TRUE(make_error_code(errc::timed_out) == std::errc::timed_out);
  EXPECT_TRUE(make_error_code(errc::would_block) == std::errc::operation_would_block);
  EXPECT_TRUE(make_error_code(errc::message_too_large) == std::errc::message_size);
  EXPECT_TRUE(make_error_code(errc::not_supported) == std::errc::not_supported);
  EXPECT_FALSE(make_error_code(errc::peer_closed) == std::errc::timed_out);
}

TEST(error, SystemErrorsKeepTheirErrno) {
  auto r = result<int>(fail_errno(EMFILE));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().value(), EMFILE);
  EXPECT_EQ(&r.error().category(), &std::system_category());
  EXPECT_TRUE(r.error() == std::errc::too_many_files_open);
}

TEST(error, AccessingAMissingValueThrowsInsteadOfDefaulting) {
  result<int> r = fail(errc::peer_closed);
  EXPECT_THROW(static_cast<void>(r.value()), std::bad_expected_access<std::error_code>);
}

TEST(error, UnknownValuesAreNamedAsSuch) {
  EXPECT_NE(error_category().message(999).find("999"), std::string::npos);
}

}  // namespace
}  // namespace duplex
