// MetaCLIP substring matcher: pure C++, no Python.
//
// Semantics (../shared/reference/curation.md): a text matches entry e iff " " + e + " "
// is a substring of spaced(text), where spaced wraps , . ; : ? ! ` in spaces, turns
// \t \n \r into spaces and pads the text with one space each side. Every entry found
// anywhere (overlaps included) is reported once.
//
// metaclip2 (MetaCLIP 2's worldwide rules, metaclip/curation/substr_matching.py): the
// text is stripped (Python str.strip's whitespace) before spacing, and an entry is padded
// with a space only on a side whose edge character is not "CJK or similar" (CJK, Thai,
// Lao, Burmese, Khmer, Tibetan, ASCII or listed full-width punctuation). Entries padded
// on both sides go to the token trie below; the others are plain substrings of the
// spaced text and go to an Aho-Corasick automaton over code points. Lone surrogates arrive
// encoded as surrogatepass UTF-8 (ED A0..BF xx), which no valid entry's bytes can
// match inside, so the rest of such a text matches as MetaCLIP 2's str matching does.
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
    struct Token {
        const char* data;
        uint32_t size;
        uint64_t hash;
    };
    std::vector<Token> tokens;
    std::vector<int32_t> token_ids;
    std::vector<int32_t> found;
};

enum class Semantics : uint8_t { kMetaclip1 = 1, kMetaclip2 = 2 };

class Matcher {
public:
    Matcher() = default;
    explicit Matcher(const std::vector<std::string>& entries, Semantics semantics = Semantics::kMetaclip1);

    Semantics semantics() const { return semantics_; }

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

    // One slot of the vocabulary hash table. The first 8 bytes of the token live in
    // the slot, so most look-ups (English words are short) touch one cache line.
    struct VocabSlot {
        uint64_t prefix;    // first min(size, 8) bytes, little-endian, zero padded
        uint32_t meta;      // high 24 bits of the hash | min(size, 255)
        uint32_t id_plus1;  // 0 marks an empty slot
    };
    struct AcEdge;
    struct AcState;
    struct Edge {
        uint64_t key;  // node << 32 | token; kEmptyKey marks an empty slot
        uint32_t target;
        uint32_t unused;
    };

private:
    static constexpr uint32_t kNone = 0xFFFFFFFFu;
    static constexpr uint32_t kHasChildren = 0x80000000u;

    int32_t token_id(const char* data, size_t size, uint64_t hash) const;
    uint32_t child(uint32_t node, uint32_t token) const;
    uint32_t add_token(std::string_view token);
    void add_edge(uint32_t node, uint32_t token, uint32_t target);
    static void insert_slot(std::vector<VocabSlot>& table, const VocabSlot& slot, uint64_t hash);
    void grow_edge_table();
    void build_automaton(const std::vector<std::string>& patterns, const std::vector<int32_t>& ids);
    void match_tokens(std::string_view text, MatchScratch& scratch) const;  // trie pass into scratch.found
    void match_automaton(std::string_view text, std::vector<int32_t>& found) const;
    struct AcCursor {
        uint32_t state = 0, fail = 0;
        bool leaf = false;
    };
    void ac_step(AcCursor& c, uint32_t cp, std::vector<int32_t>& found) const;
    const AcEdge* ac_find(uint32_t state, uint32_t cp) const;
    void ac_insert(uint32_t state, uint32_t cp, uint32_t target);

    Semantics semantics_ = Semantics::kMetaclip1;

    // Entries as given, for naming ids.
    std::string entry_bytes_;
    std::vector<uint64_t> entry_offsets_;

    // Vocabulary of distinct entry tokens, and its open addressing hash table.
    std::string token_bytes_;
    std::vector<uint64_t> token_offsets_{0};
    std::vector<VocabSlot> vocab_slots_;
    uint32_t max_token_size_ = 0;

    // Trie over token ids. Node t < vocabulary size is the one-token path [t], so a
    // text token's id is already its trie node; deeper edges live in a hash table.
    // node_info_: kHasChildren bit | (first entry ending here + 1, or 0).
    std::vector<uint32_t> node_info_;
    std::vector<Edge> edges_;
    uint64_t edge_count_ = 0;
    std::vector<int32_t> next_same_entry_;  // duplicates of an entry, chained, or -1

public:
    // metaclip2's Aho-Corasick automaton over the entries not padded on both sides, on
    // code points (a CJK character is one step, not three). Its goto edges live in one
    // open-addressing table; each edge also carries its target's failure link and the
    // first state of its target's output chain, so a step that succeeds touches one
    // slot and nothing else.
    struct AcEdge {
        uint64_t key;      // state << 32 | code point; kEmptyKey marks an empty slot
        uint32_t target;
        uint32_t fail;     // failure link of target | kLeaf if target has no children
        // The output chain of target, first link inlined: the first entry it reports
        // (-1: none) and the state after that on the chain (kNone: none).
        int32_t report_out;
        uint32_t report_next;
    };
    struct AcState {
        uint32_t fail;
        int32_t out;   // first entry whose pattern ends here, or -1 (more via next_same_entry_)
        uint32_t dict; // nearest state on the failure chain with an output, or kNone
        uint32_t leaf; // 1 if the state has no children: a step from it always fails
        // Which ASCII code points have an edge from here: in Latin-script text most steps
        // out of a state fail, and a bit test is far cheaper than a failed probe.
        uint64_t ascii_children[2];
    };
    static constexpr uint32_t kLeaf = 0x80000000u;  // states are < 2^31

private:
    std::vector<AcState> ac_states_;  // empty unless metaclip2
    std::vector<AcEdge> ac_edges_;
    uint64_t ac_edge_count_ = 0;
    // Copies of the root's edges for the Basic Multilingual Plane, by code point from
    // ac_root_lo_ (key kEmptyKey: none) over the range that has any: the root is where many
    // steps of most texts are, and one array read beats a probe (and a CJK script's root
    // edges, read this way, stay in cache). Derived from ac_edges_: rebuilt on load, not saved.
    std::vector<AcEdge> ac_root_;
    uint32_t ac_root_lo_ = 0;
    // ac_fast_[r][b]: from the root (r = 0) or its space child (r = 1), the state an ASCII
    // byte b leads to if that is one of those two again with nothing reported (0 or 1),
    // else kAcSlow; row 2 (any other state) and bytes >= 0x80 are all kAcSlow.
    static constexpr uint8_t kAcSlow = 0xFF;
    uint8_t ac_fast_[3][256] = {};
    // ac_reset_[b]: ac_fast_[0][b] where it equals ac_fast_[1][b] (b leads to the same state
    // from either), else kAcSlow.
    uint8_t ac_reset_[256] = {};
    uint32_t ac_space_state_ = kNone;
    AcCursor cursor_at(uint32_t state) const {
        return AcCursor{state, ac_states_[state].fail, ac_states_[state].leaf != 0};
    }
    bool has_duplicates_ = true;  // any entry repeated: only then is next_same_entry_ read
    void index_root();
};

// MetaCLIP 2's is_cjk_or_similar on one code point.
bool is_cjk_or_similar(uint32_t cp);
// Python's str.strip() on UTF-8 bytes (surrogatepass sequences are not whitespace).
std::string_view strip_python_whitespace(std::string_view text);

}  // namespace modefast
