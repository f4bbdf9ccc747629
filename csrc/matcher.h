// MetaCLIP substring matcher: pure C++, no Python.
//
// Semantics (../shared/reference/curation.md): a text matches entry e iff " " + e + " "
// is a substring of spaced(text), where spaced wraps , . ; : ? ! ` in spaces, turns
// \t \n \r into spaces and pads the text with one space each side. Every entry found
// anywhere (overlaps included) is reported once.
//
// Why a token trie and not Aho-Corasick: both the entry and the text are bounded by
// spaces, so " e " occurs in spaced(text) exactly when e.split(' ') is a contiguous
// run of normalized(text).split(' ') (empty tokens included, which is how runs of
// spaces are kept). Matching then costs one hash look-up per text token plus a short
// walk of a trie over token ids, instead of a state transition per byte.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

namespace modefast {

// Stable 64-bit hash of a byte string (same value on every platform and run).
uint64_t hash_bytes(const char* data, size_t size, uint64_t seed);

// Per-thread working memory for Matcher::match, reused across texts.
struct MatchScratch {
    std::string normalized;
    std::vector<int32_t> token_ids;
    std::vector<int32_t> found;
};

class Matcher {
public:
    Matcher() = default;
    explicit Matcher(const std::vector<std::string>& entries);

    size_t size() const { return entry_offsets_.empty() ? 0 : entry_offsets_.size() - 1; }
    std::string_view entry(size_t id) const;

    // Matched entry ids of one UTF-8 text, ascending and unique, appended to `out`.
    void match(std::string_view text, std::vector<int32_t>& out, MatchScratch& scratch) const;

    // CSR result for many texts: ids of text i are ids[offsets[i]:offsets[i+1]].
    // threads <= 0 means all hardware threads. Pure C++: safe to call without the GIL.
    void match_batch(const std::vector<std::string_view>& texts, int threads,
                     std::vector<int64_t>& offsets, std::vector<int32_t>& ids) const;

    void save(std::ostream& out) const;
    static Matcher load(std::istream& in);

private:
    static constexpr uint32_t kNone = 0xFFFFFFFFu;

    int32_t token_id(const char* data, size_t size) const;
    uint32_t child(uint32_t node, uint32_t token) const;
    uint32_t add_token(std::string_view token);
    void add_edge(uint32_t node, uint32_t token, uint32_t target);
    void grow_vocab_table();
    void grow_edge_table();

    // Entries as given, for naming ids.
    std::string entry_bytes_;
    std::vector<uint64_t> entry_offsets_;

    // Vocabulary of distinct entry tokens. Open addressing table of slots
    // (hash high 32 bits << 32 | token id + 1); 0 marks an empty slot.
    std::string token_bytes_;
    std::vector<uint64_t> token_offsets_{0};
    std::vector<uint64_t> vocab_slots_;
    uint32_t max_token_size_ = 0;

    // Trie over token ids. Depth-1 nodes are indexed by token id (root_child_);
    // deeper edges live in an open addressing table keyed by (node << 32 | token).
    std::vector<uint32_t> root_child_;
    std::vector<uint64_t> edge_keys_;   // kEmptyKey marks an empty slot
    std::vector<uint32_t> edge_targets_;
    uint64_t edge_count_ = 0;
    std::vector<int32_t> node_entry_;    // first entry ending at this node, or -1
    std::vector<uint8_t> node_has_children_;
    std::vector<int32_t> next_same_entry_;  // duplicates of an entry, chained, or -1
};

}  // namespace modefast
