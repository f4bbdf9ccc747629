// MetaCLIP substring matcher: pure C++, no Python.
//
// Semantics (MetaCLIP, Xu et al., "Demystifying CLIP Data", arXiv:2309.16671; its code,
// facebookresearch/MetaCLIP; docs/curation.md): a text matches entry e iff " " + e + " "
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

// Per-thread working memory for Matcher::match, reused across texts. Its size is bounded
// whatever the text's length: a long text is matched in chunks of kMatchChunkBytes (the
// token buffers hold one chunk), and the ids found are deduplicated as they pile up, so
// a 20 MB caption costs this much plus a few bytes per distinct entry, not 56 bytes per
// text byte as when every token of the text was held at once.
struct MatchScratch {
    struct Token {
        const char* data;
        uint32_t size;
        uint64_t hash;
    };
    std::vector<Token> tokens;
    std::vector<int32_t> token_ids;
    std::vector<int32_t> found;
    std::vector<int32_t> sorted;  // sort_unique's working memory
    // Trie walks still going at the end of a chunk (their nodes), continued on the next.
    std::vector<uint32_t> carry, next_carry;
    size_t found_limit = 0;  // `found` is deduplicated when it grows past this
};

// A text longer than this is matched chunk by chunk (each chunk ends at a token boundary).
constexpr size_t kMatchChunkBytes = size_t{1} << 14;

enum class Semantics : uint8_t { kMetaclip1 = 1, kMetaclip2 = 2 };

// Bumped whenever a saved matcher's layout changes, so that callers can name their cached
// files by it and build again instead of meeting an old file (2: metaclip2's automaton
// became a double array; metaclip1's layout is unchanged since format 1).
constexpr int kFileFormat = 2;

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
    struct AcUnit;
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
    void build_automaton(const std::vector<std::string>& patterns, const std::vector<int32_t>& ids);
    struct AcTrie;
    void ac_assign_codes(const std::vector<std::string>& patterns);
    AcTrie ac_build_trie(const std::vector<std::string>& patterns, const std::vector<int32_t>& ids);
    std::vector<uint32_t> ac_lay_out(const AcTrie& trie);
    void ac_link(const AcTrie& trie, const std::vector<uint32_t>& slot_of);
    void match_tokens(std::string_view text, MatchScratch& scratch) const;  // trie pass into scratch.found
    void match_token_chunk(std::string_view chunk, bool last, MatchScratch& scratch) const;
    void match_automaton(std::string_view text, MatchScratch& scratch) const;
    // Where the automaton is: a state and the fields of its slot that a step reads.
    struct AcCursor {
        uint32_t state = 0, base = 0, fail = 0;
        bool leaf = false;
    };
    void ac_step(AcCursor& c, uint32_t code, std::vector<int32_t>& found) const;
    void ac_report(int32_t at, std::vector<int32_t>& found) const;
    uint32_t ac_code(uint32_t cp) const;
    bool ac_checks_out(size_t n_entries) const;  // a loaded automaton is safe to run

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
    // code points (a CJK character is one step, not three), as a double array: code points
    // are renamed to dense codes, most frequent in the patterns first, and the child of
    // state s on code c sits in slot units[s].base + c if that slot's check is s. A step
    // reads one slot (no hash, no probe run; a failed look-up costs the same one read), and
    // states are laid out breadth first, so the shallow states that most steps visit share
    // cache lines instead of being scattered over a hash table.
    struct AcUnit {
        uint32_t check;  // the parent of the state in this slot; kNone: a free slot (and the root)
        uint32_t base;   // this state's children are at base + code
        uint32_t fail;   // failure state | kLeaf (no children)
        int32_t report;  // where in ac_outputs_ the entries reported on entering it start, or -1
    };
    static constexpr uint32_t kLeaf = 0x80000000u, kStateMask = 0x3FFFFFFFu;
    // In ac_outputs_: an entry id (>= 0), the end of a list, or a jump to offset -(v + 2).
    static constexpr int32_t kOutputsEnd = -1;

private:
    std::vector<AcUnit> ac_units_;    // slot 0 is the root; just the root unless metaclip2
    // Each reporting state's entries, all of them (its own pattern's, duplicates included,
    // and those of the patterns that end there as suffixes) in one run: a report reads one
    // cache line rather than walking a chain of states. A run copies its suffix's run while
    // that keeps it at most kFlatRun long, and jumps to it otherwise, which bounds the size
    // by the number of patterns times kFlatRun whatever the metadata.
    std::vector<int32_t> ac_outputs_;
    static constexpr uint32_t kFlatRun = 16;
    std::vector<uint32_t> ac_code_bmp_;    // code point -> code (0: in no pattern), below its size
    std::vector<uint64_t> ac_code_rest_;   // code point << 32 | code, sorted: beyond the BMP, stray bytes
    uint32_t ac_n_codes_ = 0;              // codes are 1 .. ac_n_codes_
    uint32_t ac_space_code_ = 0;
    bool ac_active_ = false;               // the root has children: there is something to find
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
        const AcUnit& u = ac_units_[state];
        return AcCursor{state, u.base, u.fail & kStateMask, (u.fail & kLeaf) != 0};
    }
    void index_fast_paths();  // tables derived from the automaton: rebuilt on load, not saved
};

// MetaCLIP 2's is_cjk_or_similar on one code point.
bool is_cjk_or_similar(uint32_t cp);
// Python's str.strip() on UTF-8 bytes (surrogatepass sequences are not whitespace).
std::string_view strip_python_whitespace(std::string_view text);

}  // namespace modefast
