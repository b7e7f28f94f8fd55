// The matcher behind `duplex bench --filter`: a regular expression searched anywhere in a row's
// name, compiled once and run in time linear in the name (a Thompson NFA, no backtracking), so no
// pattern can crash the command or keep it busy: a pattern's parse depth and length are bounded,
// and matching one name visits each state of the pattern at most once per character.
//
// The syntax is the common part of POSIX extended and ECMAScript regular expressions: literal
// characters, `.`, bracket expressions (`[a-z0-9]`, `[^/]`), `^` and `$`, groups `( )`,
// alternation `|`, the repetitions `*`, `+` and `?`, and `\` before any punctuation to make it
// literal. Refused with a reason: back-references, `{m,n}`, `\` before a letter or digit, and
// anything unbalanced.
#pragma once

#include <fmt/core.h>

#include <bitset>
#include <cstddef>
#include <expected>
#include <string>
#include <string_view>
#include <vector>

namespace duplex::cli {

class name_filter {
 public:
  // Longest pattern and deepest nesting of groups accepted: far beyond any useful filter of row
  // names, and small enough that parsing (recursive) and matching stay cheap.
  static constexpr std::size_t max_length = 1024;
  static constexpr int max_depth = 32;

  // Compiles pattern; an empty pattern matches every name. Returns why it is refused, in words
  // (e.g. "missing ')'"), if it is not in the syntax above.
  [[nodiscard]] static std::expected<name_filter, std::string> compile(std::string_view pattern) {
    name_filter f;
    if (pattern.size() > max_length) {
      return std::unexpected(fmt::format("longer than {} characters", max_length));
    }
    parser p{f, pattern};
    auto whole = p.alternation(0);
    if (!whole) return std::unexpected(whole.error());
    if (p.pos != pattern.size()) return std::unexpected(fmt::format("unmatched ')' at {}", p.pos));
    f.start_ = whole->start;
    f.nodes_[whole->end].kind = node::match;
    return f;
  }

  // Whether the pattern matches somewhere in name (a search, as grep does).
  [[nodiscard]] bool search(std::string_view name) const {
    std::vector<int> now;
    std::vector<int> next;
    std::vector<std::size_t> seen(nodes_.size(), npos);
    std::vector<int> stack;
    for (std::size_t pos = 0; pos <= name.size(); ++pos) {
      // A new attempt starts at every position; seen[] keeps each state once per position.
      if (close(start_, pos, name.size(), now, seen, stack)) return true;
      if (pos == name.size()) break;
      const auto c = static_cast<unsigned char>(name[pos]);
      next.clear();
      for (const int s : now) {
        if (nodes_[s].set.test(c) &&
            close(nodes_[s].next, pos + 1, name.size(), next, seen, stack)) {
          return true;
        }
      }
      now.swap(next);
    }
    return false;
  }

 private:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  struct node {
    enum kind_t { empty, chars, line_start, line_end, match } kind = empty;
    std::bitset<256> set;  // chars: the bytes this state accepts
    int next = -1;
    int alt = -1;  // empty: a second way on
  };
  // A piece of the automaton: one way in, one way out (an empty node whose next is still open).
  struct fragment {
    int start;
    int end;
  };

  int add(node n) {
    nodes_.push_back(n);
    return static_cast<int>(nodes_.size() - 1);
  }
  fragment piece(node::kind_t kind, const std::bitset<256>& set = {}) {
    const int end = add({});
    const int start = add({kind, set, end, -1});
    return {start, end};
  }

  // Adds the character-consuming states reachable from s without consuming into out; true if the
  // match state is among them. Iterative: the pattern's size bounds the stack, not the call depth.
  bool close(int s, std::size_t pos, std::size_t size, std::vector<int>& out,
             std::vector<std::size_t>& seen, std::vector<int>& stack) const {
    stack.assign(1, s);
    while (!stack.empty()) {
      const int i = stack.back();
      stack.pop_back();
      if (i < 0 || seen[static_cast<std::size_t>(i)] == pos) continue;
      seen[static_cast<std::size_t>(i)] = pos;
      const node& n = nodes_[static_cast<std::size_t>(i)];
      switch (n.kind) {
        case node::match: return true;
        case node::chars: out.push_back(i); break;
        case node::line_start:
          if (pos == 0) stack.push_back(n.next);
          break;
        case node::line_end:
          if (pos == size) stack.push_back(n.next);
          break;
        case node::empty:
          stack.push_back(n.alt);
          stack.push_back(n.next);
          break;
      }
    }
    return false;
  }

  struct parser {
    name_filter& f;
    std::string_view p;
    std::size_t pos = 0;

    using piece_result = std::expected<fragment, std::string>;

    [[nodiscard]] bool at(char c) const { return pos < p.size() && p[pos] == c; }

    piece_result alternation(int depth) {
      auto left = sequence(depth);
      if (!left) return left;
      while (at('|')) {
        ++pos;
        auto right = sequence(depth);
        if (!right) return right;
        const int end = f.add({});
        const int start = f.add({node::empty, {}, left->start, right->start});
        f.nodes_[left->end].next = end;
        f.nodes_[right->end].next = end;
        left = fragment{start, end};
      }
      return left;
    }

    piece_result sequence(int depth) {
      fragment whole = f.piece(node::empty);
      while (pos < p.size() && !at('|') && !at(')')) {
        auto one = repeated(depth);
        if (!one) return one;
        f.nodes_[whole.end].next = one->start;
        whole.end = one->end;
      }
      return whole;
    }

    piece_result repeated(int depth) {
      auto a = atom(depth);
      if (!a) return a;
      while (at('*') || at('+') || at('?')) {
        const char q = p[pos++];
        const int end = f.add({});
        // '*': skip or loop; '+': once, then loop; '?': skip or once.
        const int choice = f.add({node::empty, {}, a->start, end});
        f.nodes_[a->end].next = q == '?' ? end : choice;
        a = fragment{q == '+' ? a->start : choice, end};
      }
      if (at('{')) return std::unexpected(fmt::format("'{{m,n}}' is not supported (at {})", pos));
      return a;
    }

    piece_result atom(int depth) {
      const char c = p[pos];
      switch (c) {
        case '(': {
          if (depth >= max_depth) {
            return std::unexpected(fmt::format("groups nested deeper than {}", max_depth));
          }
          ++pos;
          auto inner = alternation(depth + 1);
          if (!inner) return inner;
          if (!at(')')) return std::unexpected("missing ')'");
          ++pos;
          return inner;
        }
        case '*':
        case '+':
        case '?':
          return std::unexpected(fmt::format("nothing to repeat before '{}' at {}", c, pos));
        case '{':
        case '}': return std::unexpected(fmt::format("'{{m,n}}' is not supported (at {})", pos));
        case '^': ++pos; return f.piece(node::line_start);
        case '$': ++pos; return f.piece(node::line_end);
        case '.': ++pos; return f.piece(node::chars, std::bitset<256>().set());
        case '[': return bracket();
        case '\\': {
          auto lit = escaped();
          if (!lit) return std::unexpected(lit.error());
          return f.piece(node::chars, std::bitset<256>().set(*lit));
        }
        default:
          ++pos;
          return f.piece(node::chars, std::bitset<256>().set(static_cast<unsigned char>(c)));
      }
    }

    // After '\': the literal byte it makes of the punctuation that follows.
    std::expected<unsigned char, std::string> escaped() {
      ++pos;
      if (pos == p.size()) return std::unexpected("'\\' at the end");
      const auto c = static_cast<unsigned char>(p[pos]);
      if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
        return std::unexpected(fmt::format("'\\{}' is not supported (at {})", p[pos], pos - 1));
      }
      ++pos;
      return c;
    }

    piece_result bracket() {
      const std::size_t open = pos++;
      std::bitset<256> set;
      const bool negate = at('^');
      if (negate) ++pos;
      bool first = true;
      while (pos < p.size() && (first || !at(']'))) {
        first = false;
        unsigned char lo = 0;
        if (at('\\')) {
          auto e = escaped();
          if (!e) return std::unexpected(e.error());
          lo = *e;
        } else {
          lo = static_cast<unsigned char>(p[pos++]);
        }
        unsigned char hi = lo;
        if (at('-') && pos + 1 < p.size() && p[pos + 1] != ']') {
          ++pos;
          if (at('\\')) {
            auto e = escaped();
            if (!e) return std::unexpected(e.error());
            hi = *e;
          } else {
            hi = static_cast<unsigned char>(p[pos++]);
          }
          if (hi < lo) return std::unexpected(fmt::format("bad range in '[' at {}", open));
        }
        for (unsigned v = lo; v <= hi; ++v)
          set.set(v);
      }
      if (!at(']')) return std::unexpected(fmt::format("missing ']' for '[' at {}", open));
      ++pos;
      if (negate) set.flip();
      return f.piece(node::chars, set);
    }
  };

  std::vector<node> nodes_;
  int start_ = -1;
};

}  // namespace duplex::cli
