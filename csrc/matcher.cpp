#include "matcher.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <istream>
#include <ostream>
#include <stdexcept>
#include <thread>

namespace modefast {
namespace {

constexpr uint64_t kEmptyKey = ~uint64_t{0};
constexpr uint64_t kMul = 0x9E3779B97F4A7C15ull;

// Little-endian load of n <= 8 bytes regardless of the host's byte order, so hashes are
// portable. Whole-word loads (overlapping for 4..7 bytes) instead of a byte loop: every
// text token goes through here twice (hash, then slot prefix), and most are short.
inline uint32_t load32(const unsigned char* p) {
    uint32_t w;
    std::memcpy(&w, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap32(w);
#endif
    return w;
}

inline uint64_t load64(const unsigned char* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}

inline uint64_t load_le(const unsigned char* p, size_t n) {
    if (n >= 8) return load64(p);
    if (n >= 4) return uint64_t{load32(p)} | (uint64_t{load32(p + n - 4)} << (8 * (n - 4)));
    if (n == 0) return 0;
    // 1..3 bytes: first, middle and last (the same byte more than once when n < 3).
    return uint64_t{p[0]} | (uint64_t{p[n / 2]} << (8 * (n / 2))) | (uint64_t{p[n - 1]} << (8 * (n - 1)));
}

inline bool equal_bytes(const char* a, const char* b, size_t n) {
    for (; n >= 8; a += 8, b += 8, n -= 8)
        if (load64(reinterpret_cast<const unsigned char*>(a)) != load64(reinterpret_cast<const unsigned char*>(b))) return false;
    return n == 0 || load_le(reinterpret_cast<const unsigned char*>(a), n) == load_le(reinterpret_cast<const unsigned char*>(b), n);
}

constexpr uint64_t mix64(uint64_t x) {
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

inline uint64_t edge_key(uint32_t node, uint32_t token) {
    return (uint64_t{node} << 32) | token;
}

inline bool is_wrapped_punct(char c) {
    return c == ',' || c == '.' || c == ';' || c == ':' || c == '?' || c == '!' || c == '`';
}

// What the spacing rule does with each byte: kept, turned into a space (space, tab,
// newline, CR), or wrapped in spaces (, . ; : ? ! `). Bytes >= 0x80 are always kept.
enum ByteClass : uint8_t { kKeep = 0, kSpace = 1, kWrap = 2 };

struct ByteClasses {
    uint8_t of[256] = {};
    constexpr ByteClasses() {
        of[static_cast<unsigned char>(' ')] = of[static_cast<unsigned char>('\t')] = kSpace;
        of[static_cast<unsigned char>('\n')] = of[static_cast<unsigned char>('\r')] = kSpace;
        for (char c : {',', '.', ';', ':', '?', '!', '`'}) of[static_cast<unsigned char>(c)] = kWrap;
    }
};
constexpr ByteClasses kByteClass{};

// The tokens of spaced(text).split(' ') without its two padding spaces (they only bound
// the first and last tokens, which splitting already does), read straight off the text:
// no spaced copy is built. A space-like byte ends a token; a wrapped punctuation byte
// ends one and is a token of its own. Empty tokens (runs of spaces) are kept.
template <class F>
inline void for_each_spaced_token(std::string_view s, F&& f) {
    const char* p = s.data();
    const size_t n = s.size();
    size_t start = 0;
    for (size_t i = 0; i < n; ++i) {
        const uint8_t cls = kByteClass.of[static_cast<unsigned char>(p[i])];
        if (cls == kKeep) continue;
        f(p + start, i - start);
        if (cls == kWrap) f(p + i, 1);
        start = i + 1;
    }
    f(p + start, n - start);
}

template <class F>
void for_each_token(std::string_view s, F&& f) {
    size_t start = 0;
    for (size_t i = 0; i <= s.size(); ++i) {
        if (i == s.size() || s[i] == ' ') {
            f(s.data() + start, i - start);
            start = i + 1;
        }
    }
}

constexpr uint32_t kMalformed = 0x110000;  // beyond Unicode: neither whitespace nor CJK

// One code point starting at p (n bytes available); kMalformed (length 1) for a byte
// that does not start a well-formed sequence.
uint32_t decode_at(const unsigned char* p, size_t n, size_t* len) {
    const unsigned char b = p[0];
    size_t need = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    if (need == 0 || need > n) {
        *len = 1;
        return kMalformed;
    }
    uint32_t cp = need == 1 ? b : need == 2 ? (b & 0x1F) : need == 3 ? (b & 0x0F) : (b & 0x07);
    for (size_t i = 1; i < need; ++i) {
        if ((p[i] & 0xC0) != 0x80) {
            *len = 1;
            return kMalformed;
        }
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    *len = need;
    return cp;
}

uint32_t first_code_point(std::string_view s) {
    size_t len = 0;
    return decode_at(reinterpret_cast<const unsigned char*>(s.data()), s.size(), &len);
}

// The last code point and its byte length.
uint32_t last_code_point(std::string_view s, size_t* len) {
    size_t start = s.size() - 1;
    // A code point is at most 4 bytes: step back over up to 3 continuation bytes.
    while (start > 0 && s.size() - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t got = 0;
    uint32_t cp = decode_at(reinterpret_cast<const unsigned char*>(s.data()) + start, s.size() - start, &got);
    if (start + got != s.size()) {  // malformed tail: the last byte on its own
        *len = 1;
        return kMalformed;
    }
    *len = got;
    return cp;
}

// Python's str.isspace() code points (what str.strip() removes).
bool is_python_space(uint32_t cp) {
    if (cp < 0x80) return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20);
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Spaced text never holds tab/newline/CR, and holds each of , . ; : ? ! ` only with a
// space on both sides; a pattern breaking that can never match (entries like "Mr." or
// "Ph.D.", common in English lists), so it need not cost the automaton anything.
bool can_occur_in_spaced_text(std::string_view p) {
    for (size_t i = 0; i < p.size(); ++i) {
        const char c = p[i];
        if (c == '\t' || c == '\n' || c == '\r') return false;
        if (is_wrapped_punct(c) && ((i > 0 && p[i - 1] != ' ') || (i + 1 < p.size() && p[i + 1] != ' '))) return false;
    }
    return true;
}

size_t table_size_for(size_t items) {
    size_t size = 16;
    while (size < items * 2) size <<= 1;  // load factor <= 0.5 keeps misses short
    return size;
}

// --- binary file helpers -------------------------------------------------------
constexpr char kMagic[8] = {'M', 'F', 'M', 'A', 'T', 'C', 'H', '1'};
// metaclip2 files: the metaclip1 layout, then the semantics byte and the automaton (as a
// double array: MFMATC2D).
// metaclip1 matchers keep writing MFMATCH1, byte for byte as before.
// MFMATCH2 held the automaton as a hash table of edges; its files are refused by name.
constexpr char kMagic2Old[8] = {'M', 'F', 'M', 'A', 'T', 'C', 'H', '2'};
constexpr char kMagic2[8] = {'M', 'F', 'M', 'A', 'T', 'C', '2', 'D'};

template <class T>
void write_vec(std::ostream& out, const std::vector<T>& v) {
    uint64_t n = v.size();
    out.write(reinterpret_cast<const char*>(&n), sizeof n);
    out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
}

void write_str(std::ostream& out, const std::string& s) {
    uint64_t n = s.size();
    out.write(reinterpret_cast<const char*>(&n), sizeof n);
    out.write(s.data(), static_cast<std::streamsize>(n));
}

template <class T>
void read_pod(std::istream& in, T& value) {
    in.read(reinterpret_cast<char*>(&value), sizeof value);
    if (!in) throw std::runtime_error("matcher file is truncated");
}

template <class T>
void read_vec(std::istream& in, std::vector<T>& v, uint64_t max_items) {
    uint64_t n = 0;
    read_pod(in, n);
    if (n > max_items) throw std::runtime_error("matcher file is corrupt (array length out of range)");
    v.resize(n);
    in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(T)));
    if (!in) throw std::runtime_error("matcher file is truncated");
}

void read_str(std::istream& in, std::string& s, uint64_t max_size) {
    uint64_t n = 0;
    read_pod(in, n);
    if (n > max_size) throw std::runtime_error("matcher file is corrupt (string length out of range)");
    s.resize(n);
    in.read(s.data(), static_cast<std::streamsize>(n));
    if (!in) throw std::runtime_error("matcher file is truncated");
}

}  // namespace

bool is_cjk_or_similar(uint32_t cp) {
    // CJK ideographs, extensions, compatibility ideographs, radicals, ideographic description.
    if ((cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
        (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
        (cp >= 0x2CEB0 && cp <= 0x2EBEF) || (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2E80 && cp <= 0x2EFF) ||
        (cp >= 0x2F00 && cp <= 0x2FDF) || (cp >= 0x2FF0 && cp <= 0x2FFF))
        return true;
    // Thai, Lao, Burmese, Khmer, Tibetan.
    if ((cp >= 0x0E00 && cp <= 0x0EFF) || (cp >= 0x1000 && cp <= 0x109F) || (cp >= 0x1780 && cp <= 0x17FF) ||
        (cp >= 0x0F00 && cp <= 0x0FFF))
        return true;
    // Python's string.punctuation (ASCII).
    if (cp < 0x80) return (cp >= 0x21 && cp <= 0x2F) || (cp >= 0x3A && cp <= 0x40) || (cp >= 0x5B && cp <= 0x60) ||
                          (cp >= 0x7B && cp <= 0x7E);
    // MetaCLIP 2's additional (full-width) punctuation: ，。、；：？！“”‘’（）【】《》〈〉「」『』～—
    switch (cp) {
        case 0xFF0C: case 0x3002: case 0x3001: case 0xFF1B: case 0xFF1A: case 0xFF1F: case 0xFF01:
        case 0x201C: case 0x201D: case 0x2018: case 0x2019: case 0xFF08: case 0xFF09: case 0x3010:
        case 0x3011: case 0x300A: case 0x300B: case 0x3008: case 0x3009: case 0x300C: case 0x300D:
        case 0x300E: case 0x300F: case 0xFF5E: case 0x2014:
            return true;
        default:
            return false;
    }
}

std::string_view strip_python_whitespace(std::string_view text) {
    if (text.empty()) return text;
    const auto first = static_cast<unsigned char>(text.front()), last = static_cast<unsigned char>(text.back());
    if (first < 0x80 && last < 0x80 && !is_python_space(first) && !is_python_space(last)) return text;  // usual case
    size_t len = 0;
    while (!text.empty() && is_python_space(first_code_point(text))) {
        decode_at(reinterpret_cast<const unsigned char*>(text.data()), text.size(), &len);
        text.remove_prefix(len);
    }
    while (!text.empty() && is_python_space(last_code_point(text, &len))) text.remove_suffix(len);
    return text;
}

uint64_t hash_bytes(const char* data, size_t size, uint64_t seed) {
    const auto* p = reinterpret_cast<const unsigned char*>(data);
    uint64_t h = mix64(seed + kMul * (uint64_t{size} + 1));
    while (size >= 8) {
        h = mix64(h ^ load_le(p, 8)) * kMul;
        p += 8;
        size -= 8;
    }
    if (size > 0) h = mix64(h ^ load_le(p, size) ^ (uint64_t{size} << 59));
    return mix64(h);
}

namespace {

// hash_bytes(p, n, 0), the vocabulary's hash, with its first mix (which depends on the
// size alone) looked up: one multiply chain fewer on the path of every text token.
struct SizeMixes {
    uint64_t of[256] = {};
    constexpr SizeMixes() {
        for (uint64_t n = 0; n < 256; ++n) of[n] = mix64(kMul * (n + 1));
    }
};
constexpr SizeMixes kSizeMix{};

inline uint64_t hash_token(const char* data, size_t size) {
    if (size >= 256) return hash_bytes(data, size, 0);
    const auto* p = reinterpret_cast<const unsigned char*>(data);
    uint64_t h = kSizeMix.of[size];
    while (size >= 8) {
        h = mix64(h ^ load64(p)) * kMul;
        p += 8;
        size -= 8;
    }
    if (size > 0) h = mix64(h ^ load_le(p, size) ^ (uint64_t{size} << 59));
    return mix64(h);
}

}  // namespace

// --- construction ----------------------------------------------------------------

namespace {

inline uint32_t slot_meta(uint64_t hash, size_t size) {
    return (static_cast<uint32_t>(hash >> 32) & 0xFFFFFF00u) | static_cast<uint32_t>(std::min<size_t>(size, 255));
}

}  // namespace

Matcher::Matcher(const std::vector<std::string>& entries, Semantics semantics) : semantics_(semantics) {
    if (entries.size() >= static_cast<size_t>(INT32_MAX) - 1)
        throw std::invalid_argument("too many entries (ids are int32)");
    if (semantics != Semantics::kMetaclip1 && semantics != Semantics::kMetaclip2)
        throw std::invalid_argument("unknown matching semantics");
    entry_offsets_.reserve(entries.size() + 1);
    entry_offsets_.push_back(0);
    size_t total = 0;
    for (const auto& e : entries) total += e.size();
    entry_bytes_.reserve(total);
    for (const auto& e : entries) {
        entry_bytes_.append(e);
        entry_offsets_.push_back(entry_bytes_.size());
    }
    next_same_entry_.assign(entries.size(), -1);

    // Which entries the token trie takes: all (metaclip1), or those padded on both sides
    // (metaclip2); the rest become automaton patterns, padded as MetaCLIP 2 pads them.
    std::vector<int32_t> trie_ids, ac_ids;
    std::vector<std::string> ac_patterns;
    trie_ids.reserve(entries.size());
    for (size_t id = 0; id < entries.size(); ++id) {
        const std::string& e = entries[id];
        bool pad_left = true, pad_right = true;
        if (semantics == Semantics::kMetaclip2) {
            if (e.empty()) throw std::invalid_argument("metaclip2 entries must not be empty (entry " + std::to_string(id) + ")");
            size_t len = 0;
            pad_left = !is_cjk_or_similar(first_code_point(e));
            pad_right = !is_cjk_or_similar(last_code_point(e, &len));
        }
        if (pad_left && pad_right) {
            trie_ids.push_back(static_cast<int32_t>(id));
        } else {
            std::string pattern = (pad_left ? " " : "") + e + (pad_right ? " " : "");
            if (can_occur_in_spaced_text(pattern)) {
                ac_ids.push_back(static_cast<int32_t>(id));
                ac_patterns.push_back(std::move(pattern));
            }
        }
    }

    vocab_slots_.assign(table_size_for(trie_ids.size() + 1), VocabSlot{0, 0, 0});
    edges_.assign(table_size_for(trie_ids.size() / 2 + 1), Edge{kEmptyKey, 0, 0});

    // Pass 1: the vocabulary, so that node ids 0..V-1 can be the one-token paths.
    std::vector<uint32_t> entry_tokens;
    std::vector<uint64_t> entry_token_offsets{0};
    entry_token_offsets.reserve(trie_ids.size() + 1);
    for (int32_t id : trie_ids) {
        for_each_token(entries[id], [&](const char* p, size_t n) { entry_tokens.push_back(add_token({p, n})); });
        entry_token_offsets.push_back(entry_tokens.size());
    }

    // Pass 2: the trie.
    const size_t n_tokens = token_offsets_.size() - 1;
    node_info_.assign(n_tokens, 0);
    std::vector<int32_t> last_of_node(n_tokens, -1);  // tail of each node's duplicate chain
    for (size_t k_entry = 0; k_entry < trie_ids.size(); ++k_entry) {
        const size_t id = static_cast<size_t>(trie_ids[k_entry]);
        const uint32_t* tok = entry_tokens.data() + entry_token_offsets[k_entry];
        const size_t len = entry_token_offsets[k_entry + 1] - entry_token_offsets[k_entry];
        uint32_t node = tok[0];
        for (size_t k = 1; k < len; ++k) {
            uint32_t next = child(node, tok[k]);
            if (next == kNone) {
                next = static_cast<uint32_t>(node_info_.size());
                node_info_.push_back(0);
                last_of_node.push_back(-1);
                add_edge(node, tok[k], next);
                node_info_[node] |= kHasChildren;
            }
            node = next;
        }
        // Duplicate entries are legal input and all their ids are reported, as the
        // naive reference does; they are chained so the common case stays one int.
        if ((node_info_[node] & ~kHasChildren) == 0) {
            node_info_[node] |= static_cast<uint32_t>(id) + 1;
        } else {
            next_same_entry_[last_of_node[node]] = static_cast<int32_t>(id);
        }
        last_of_node[node] = static_cast<int32_t>(id);
    }
    if (semantics == Semantics::kMetaclip2) build_automaton(ac_patterns, ac_ids);
}

namespace {

// The one table of labelled edges, (node, label) -> target: the token trie's (saved with
// the matcher) and the automaton's trie while it is built. Open addressing, linear
// probing, load <= 1/2; `count` is the number of edges in `table`.
uint32_t edge_find(const std::vector<Matcher::Edge>& table, uint32_t node, uint32_t label) {
    const uint64_t key = edge_key(node, label);
    const size_t mask = table.size() - 1;
    for (size_t slot = mix64(key) & mask;; slot = (slot + 1) & mask) {
        const Matcher::Edge& e = table[slot];
        if (e.key == key) return e.target;
        if (e.key == kEmptyKey) return UINT32_MAX;
    }
}

void edge_place(std::vector<Matcher::Edge>& table, const Matcher::Edge& e) {
    const size_t mask = table.size() - 1;
    size_t slot = mix64(e.key) & mask;
    while (table[slot].key != kEmptyKey) slot = (slot + 1) & mask;
    table[slot] = e;
}

void edge_insert(std::vector<Matcher::Edge>& table, uint64_t& count, uint32_t node, uint32_t label, uint32_t target) {
    if ((count + 1) * 2 > table.size()) {
        std::vector<Matcher::Edge> old(table.size() * 2, Matcher::Edge{kEmptyKey, 0, 0});
        old.swap(table);
        for (const Matcher::Edge& e : old)
            if (e.key != kEmptyKey) edge_place(table, e);
    }
    edge_place(table, Matcher::Edge{edge_key(node, label), target, 0});
    ++count;
}

// "The first slot at or after x still in the set", for a set that only loses slots, in
// near-constant time: next[i] == i marks a member, anything else points further right
// (a union-find with path compression). Grows on demand; new slots are members.
struct NextMember {
    std::vector<uint32_t> next;
    void reach(size_t size) {
        for (size_t i = next.size(); i < size; ++i) next.push_back(static_cast<uint32_t>(i));
    }
    uint32_t find(uint32_t x) {
        uint32_t r = x;
        while (r < next.size() && next[r] != r) r = next[r];
        while (x < next.size() && x != r) {  // path compression
            const uint32_t nx = next[x];
            next[x] = r;
            x = nx;
        }
        return r;  // next.size() when none is left below the end: the caller grows
    }
    void remove(uint32_t x) { next[x] = x + 1; }
};

// Free slots of a growing double array. A state with one child takes the first free slot;
// a state with several looks only among free slots that have not been turned down often
// (darts' trick): the dense front of the array is full of holes no wide set of children
// fits, and scanning them for every such state made the build quadratic.
class FreeSlots {
public:
    explicit FreeSlots(std::vector<Matcher::AcUnit>& units) : units_(units) {}
    // The first free slot at or after x (several children: the first still worth trying).
    uint32_t at_or_after(uint32_t x, bool several) {
        NextMember& set = several ? open_ : free_;
        for (;;) {
            reach(x + 1);
            const uint32_t r = set.find(x);
            if (r < set.next.size()) return r;
            x = r;
        }
    }
    bool free(uint32_t x) {
        reach(x + 1);
        return free_.next[x] == x;
    }
    void take(uint32_t x) {
        reach(x + 2);
        free_.remove(x);
        open_.remove(x);
    }
    void turn_down(uint32_t x) {
        if (++refusals_[x] >= kMaxRefusals) open_.remove(x);
    }
    // Slots below `size` exist (new ones free).
    void reach(size_t size) {
        if (size <= refusals_.size()) return;
        if (size >= Matcher::kStateMask) throw std::invalid_argument("metadata too large for the automaton");
        size = std::max(size, refusals_.size() + refusals_.size() / 2 + 64);
        free_.reach(size);
        open_.reach(size);
        refusals_.resize(size, 0);
        units_.resize(size, Matcher::AcUnit{UINT32_MAX, 0, 0, -1});
    }

private:
    static constexpr uint8_t kMaxRefusals = 8;
    std::vector<Matcher::AcUnit>& units_;
    NextMember free_, open_;
    std::vector<uint8_t> refusals_;
};

// Code points of a UTF-8 string; a byte that starts no well-formed sequence becomes a
// value above Unicode of its own, so it only ever equals the same stray byte.
template <class F>
void for_each_code_point(std::string_view s, F&& f) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    size_t i = 0;
    while (i < s.size()) {
        if (p[i] < 0x80) {  // ASCII fast path
            f(uint32_t{p[i]});
            ++i;
            continue;
        }
        size_t len = 0;
        uint32_t cp = decode_at(p + i, s.size() - i, &len);
        f(cp == kMalformed ? kMalformed + p[i] : cp);
        i += len;
    }
}

}  // namespace

inline uint32_t Matcher::ac_code(uint32_t cp) const {
    if (cp < ac_code_bmp_.size()) return ac_code_bmp_[cp];
    if (cp < 0x10000 || ac_code_rest_.empty()) return 0;
    const auto it = std::lower_bound(ac_code_rest_.begin(), ac_code_rest_.end(), uint64_t{cp} << 32);
    return it != ac_code_rest_.end() && (*it >> 32) == cp ? static_cast<uint32_t>(*it) : 0;
}

// The patterns' trie on codes, numbered breadth first (state 0 the root).
struct Matcher::AcTrie {
    std::vector<uint32_t> code;         // the code on the edge into each state
    std::vector<int32_t> out;           // first entry whose pattern ends there, or -1
    std::vector<uint32_t> first_child;  // children of k: first_child[k] .. first_child[k + 1] - 1
};

// The automaton is built in four steps: codes for the code points, the trie of the
// patterns, its layout as a double array, then failure links and output runs.
void Matcher::build_automaton(const std::vector<std::string>& patterns, const std::vector<int32_t>& ids) {
    ac_assign_codes(patterns);
    const AcTrie trie = ac_build_trie(patterns, ids);
    const std::vector<uint32_t> slot_of = ac_lay_out(trie);
    ac_link(trie, slot_of);
    index_fast_paths();
}

void Matcher::ac_assign_codes(const std::vector<std::string>& patterns) {
    // Codes: 1, 2, ... to the code points by how often the patterns use them, ties by code
    // point (deterministic), so the frequent ones are small and children pack densely.
    std::vector<std::pair<uint64_t, uint32_t>> counts;  // (count, code point)
    {
        std::vector<uint64_t> bmp(0x10000, 0);
        std::vector<uint32_t> rest;
        for (const std::string& p : patterns)
            for_each_code_point(p, [&](uint32_t cp) { cp < 0x10000 ? void(++bmp[cp]) : rest.push_back(cp); });
        for (uint32_t cp = 0; cp < 0x10000; ++cp)
            if (bmp[cp] > 0) counts.emplace_back(bmp[cp], cp);
        std::sort(rest.begin(), rest.end());
        for (size_t i = 0; i < rest.size();) {
            size_t j = i;
            while (j < rest.size() && rest[j] == rest[i]) ++j;
            counts.emplace_back(j - i, rest[i]);
            i = j;
        }
    }
    std::sort(counts.begin(), counts.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    ac_n_codes_ = static_cast<uint32_t>(counts.size());
    uint32_t bmp_top = 0;
    for (const auto& c : counts)
        if (c.second < 0x10000) bmp_top = std::max(bmp_top, c.second + 1);
    ac_code_bmp_.assign(bmp_top, 0);
    ac_code_rest_.clear();
    for (uint32_t code = 1; code <= ac_n_codes_; ++code) {
        const uint32_t cp = counts[code - 1].second;
        if (cp < 0x10000) {
            ac_code_bmp_[cp] = code;
        } else {
            ac_code_rest_.push_back(uint64_t{cp} << 32 | code);
        }
    }
    std::sort(ac_code_rest_.begin(), ac_code_rest_.end());
    std::vector<std::pair<uint64_t, uint32_t>>().swap(counts);
}

Matcher::AcTrie Matcher::ac_build_trie(const std::vector<std::string>& patterns, const std::vector<int32_t>& ids) {
    // The trie, numbered in insertion order (trie states, not yet slots).
    std::vector<Edge> edges(16, Edge{kEmptyKey, 0, 0});
    uint64_t n_edges = 0;
    std::vector<int32_t> out(1, -1), last(1, -1);  // first entry ending at each state; tail of its duplicates
    std::vector<uint32_t> parent(1, 0), code_in(1, 0);
    for (size_t k = 0; k < patterns.size(); ++k) {
        uint32_t state = 0;
        for_each_code_point(patterns[k], [&](uint32_t cp) {
            const uint32_t code = ac_code(cp);
            uint32_t next = edge_find(edges, state, code);
            if (next == UINT32_MAX) {
                if (out.size() >= kStateMask / 2) throw std::invalid_argument("metadata too large for the automaton");
                next = static_cast<uint32_t>(out.size());
                out.push_back(-1);
                last.push_back(-1);
                parent.push_back(state);
                code_in.push_back(code);
                edge_insert(edges, n_edges, state, code, next);
            }
            state = next;
        });
        if (out[state] < 0) {
            out[state] = ids[k];
        } else {
            next_same_entry_[last[state]] = ids[k];
        }
        last[state] = ids[k];
    }
    std::vector<int32_t>().swap(last);
    const size_t n = out.size();
    // Children of each trie state, by code, in CSR form.
    std::vector<uint32_t> begin(n + 1, 0);
    for (size_t st = 1; st < n; ++st) ++begin[parent[st] + 1];
    for (size_t st = 0; st < n; ++st) begin[st + 1] += begin[st];
    std::vector<uint32_t> children(n > 0 ? n - 1 : 0), fill(begin.begin(), begin.end() - 1);
    for (size_t st = 1; st < n; ++st) children[fill[parent[st]]++] = static_cast<uint32_t>(st);
    std::vector<uint32_t>().swap(fill);
    std::vector<uint32_t>().swap(parent);
    for (size_t st = 0; st < n; ++st)
        std::sort(children.begin() + begin[st], children.begin() + begin[st + 1],
                  [&](uint32_t a, uint32_t b) { return code_in[a] < code_in[b]; });

    // Numbered again, breadth first: a state's children are then consecutive numbers in
    // code order, and the layout and linking passes read their arrays in order.
    std::vector<uint32_t> order{0}, first_child(n + 1, static_cast<uint32_t>(n));
    order.reserve(n);
    for (size_t k = 0; k < order.size(); ++k) {
        const uint32_t st = order[k];
        first_child[k] = static_cast<uint32_t>(order.size());
        order.insert(order.end(), children.begin() + begin[st], children.begin() + begin[st + 1]);
    }
    std::vector<uint32_t>().swap(begin);
    std::vector<uint32_t>().swap(children);
    std::vector<uint32_t> code(n);
    std::vector<int32_t> out_bfs(n);
    for (size_t k = 0; k < n; ++k) {
        code[k] = code_in[order[k]];
        out_bfs[k] = out[order[k]];
    }
    return AcTrie{std::move(code), std::move(out_bfs), std::move(first_child)};
}

// Slot of each trie state (by its breadth-first number).
std::vector<uint32_t> Matcher::ac_lay_out(const AcTrie& trie) {
    // Slots, breadth first: each state's children at the first base where all are free.
    ac_units_.clear();
    FreeSlots slots(ac_units_);
    const size_t n = trie.code.size();
    const std::vector<uint32_t>& code = trie.code;
    std::vector<uint32_t> slot_of(n, 0);
    slots.take(0);
    ac_units_[0] = AcUnit{kNone, 0, 0, -1};
    uint32_t top = 1;  // slots needed so that base + any code stays inside
    for (size_t k = 0; k < n; ++k) {
        const uint32_t s = slot_of[k], lo = trie.first_child[k], hi = trie.first_child[k + 1];
        if (lo == hi) {
            ac_units_[s].fail = kLeaf;
            continue;
        }
        const uint32_t first = code[lo];
        const bool several = hi - lo > 1;
        uint32_t base = 0;
        for (uint32_t f = slots.at_or_after(first + 1, several);; f = slots.at_or_after(f + 1, several)) {
            base = f - first;
            bool ok = true;
            for (uint32_t i = lo + 1; ok && i < hi; ++i) ok = slots.free(base + code[i]);
            if (ok) break;
            slots.turn_down(f);
        }
        ac_units_[s].base = base;
        top = std::max(top, base + ac_n_codes_ + 1);
        for (uint32_t i = lo; i < hi; ++i) {
            const uint32_t at = base + code[i];
            slots.take(at);
            ac_units_[at] = AcUnit{s, 0, 0, -1};
            slot_of[i] = at;
        }
    }
    slots.reach(top);
    ac_units_.resize(top, AcUnit{kNone, 0, 0, -1});
    ac_units_.shrink_to_fit();
    if (ac_units_.size() > kStateMask) throw std::invalid_argument("metadata too large for the automaton");
    return slot_of;
}

void Matcher::ac_link(const AcTrie& trie, const std::vector<uint32_t>& slot_of) {
    // Failure links and output runs, breadth first (a failure link is always shallower, so
    // its run is written before the runs that copy or jump to it).
    std::vector<int32_t> out_at(ac_units_.size(), -1);    // by slot: first entry ending there
    std::vector<uint32_t> run_size(ac_units_.size(), 0);  // by slot: its run, end or jump excluded
    const size_t n = trie.code.size();
    for (size_t k = 0; k < n; ++k) out_at[slot_of[k]] = trie.out[k];
    ac_outputs_.clear();
    for (size_t k = 1; k < n; ++k) {
        const uint32_t s = slot_of[k], p = ac_units_[s].check, c = trie.code[k];
        uint32_t f = 0;
        if (p != 0) {
            for (uint32_t g = ac_units_[p].fail & kStateMask;; g = ac_units_[g].fail & kStateMask) {
                const AcUnit& gu = ac_units_[g];
                if (!(gu.fail & kLeaf) && ac_units_[gu.base + c].check == g) {
                    f = gu.base + c;
                    break;
                }
                if (g == 0) break;
            }
        }
        AcUnit& u = ac_units_[s];
        u.fail = (u.fail & kLeaf) | f;
        const int32_t suffix = ac_units_[f].report;  // f's run: everything its suffixes report
        if (out_at[s] < 0) {
            u.report = suffix;  // nothing of its own: share the suffix's run
            run_size[s] = run_size[f];
            continue;
        }
        if (ac_outputs_.size() + kFlatRun + 2 >= static_cast<size_t>(INT32_MAX))
            throw std::invalid_argument("metadata too large for the automaton");
        u.report = static_cast<int32_t>(ac_outputs_.size());
        for (int32_t id = out_at[s]; id >= 0; id = next_same_entry_[id]) {
            ac_outputs_.push_back(id);
            ++run_size[s];
        }
        if (suffix < 0) {
            ac_outputs_.push_back(kOutputsEnd);
        } else if (run_size[s] + run_size[f] <= kFlatRun) {
            for (uint32_t j = 0; j <= run_size[f]; ++j) {  // f's run with its end or jump
                const int32_t v = ac_outputs_[static_cast<size_t>(suffix) + j];
                ac_outputs_.push_back(v);
            }
            run_size[s] += run_size[f];
        } else {
            ac_outputs_.push_back(-(suffix + 2));
        }
    }
}

void Matcher::index_fast_paths() {
    ac_active_ = !ac_units_.empty() && !(ac_units_[0].fail & kLeaf);
    ac_space_code_ = ac_code(' ');

    // The fast path of match_automaton: from the root, and from the root's space child
    // (where every word of a Latin-script text starts, since most patterns there begin
    // with a space), where each ASCII byte leads, spacing rule included, when it lands
    // on one of those two again and reports nothing. Found by running the automaton.
    ac_space_state_ = kNone;
    if (ac_active_ && ac_space_code_ != 0 && ac_units_[ac_units_[0].base + ac_space_code_].check == 0)
        ac_space_state_ = ac_units_[0].base + ac_space_code_;
    std::fill(&ac_fast_[0][0], &ac_fast_[0][0] + sizeof ac_fast_, kAcSlow);
    std::fill(ac_reset_, ac_reset_ + sizeof ac_reset_, kAcSlow);
    if (!ac_active_) return;
    std::vector<int32_t> found;
    for (uint32_t from = 0; from < 2; ++from) {
        if (from == 1 && ac_space_state_ == kNone) break;
        for (uint32_t b = 0; b < 0x80; ++b) {
            AcCursor c = cursor_at(from == 0 ? 0 : ac_space_state_);
            found.clear();
            if (kByteClass.of[b] == kKeep) {
                ac_step(c, ac_code(b), found);
            } else if (kByteClass.of[b] == kSpace) {
                ac_step(c, ac_space_code_, found);
            } else {
                ac_step(c, ac_space_code_, found);
                ac_step(c, ac_code(b), found);
                ac_step(c, ac_space_code_, found);
            }
            if (found.empty() && c.state == 0) ac_fast_[from][b] = 0;
            if (found.empty() && c.state == ac_space_state_) ac_fast_[from][b] = 1;
        }
    }
    for (uint32_t b = 0; b < 256; ++b)
        ac_reset_[b] = ac_space_state_ == kNone || ac_fast_[0][b] == ac_fast_[1][b] ? ac_fast_[0][b] : kAcSlow;
}

namespace {
void bound_found(MatchScratch& scratch);
}  // namespace

// Every entry reported on entering a state, from its run in ac_outputs_.
inline void Matcher::ac_report(int32_t at, std::vector<int32_t>& found) const {
    const int32_t* o = ac_outputs_.data();
    for (;;) {
        const int32_t v = o[at];
        if (v >= 0) {
            found.push_back(v);
            ++at;
        } else if (v == kOutputsEnd) {
            return;
        } else {
            at = -(v + 2);
        }
    }
}

// One step of the automaton on a code (0: a code point in no pattern).
inline void Matcher::ac_step(AcCursor& c, uint32_t code, std::vector<int32_t>& found) const {
    if (code == 0) {  // no pattern spans this code point: back to the root, nothing found
        c = cursor_at(0);
        return;
    }
    for (;;) {
        if (!c.leaf) {
            const uint32_t t = c.base + code;
            const AcUnit& u = ac_units_[t];
            if (u.check == c.state) {
                c.state = t;
                c.base = u.base;
                c.fail = u.fail & kStateMask;
                c.leaf = (u.fail & kLeaf) != 0;
                if (u.report >= 0) ac_report(u.report, found);
                return;
            }
        }
        if (c.state == 0) return;  // no pattern starts with this code
        c = cursor_at(c.fail);
    }
}

// The automaton over spaced(text) = " " + text with the spacing rule applied + " ",
// produced on the fly from the text's bytes rather than copied out first. While the
// automaton is at the root or the root's space child, an ASCII byte costs one look-up
// in ac_reset_ or ac_fast_; everything else takes ac_step, code point by code point. The
// bytes are walked in stretches of kMatchChunkBytes, the ids found bounded between them.
void Matcher::match_automaton(std::string_view text, MatchScratch& scratch) const {
    auto& found = scratch.found;
    const auto* p = reinterpret_cast<const unsigned char*>(text.data());
    const size_t n = text.size();
    AcCursor c = cursor_at(0);
    ac_step(c, ac_space_code_, found);
    uint8_t fast = c.state == 0 ? 0 : c.state == ac_space_state_ ? 1 : 2;  // row of ac_fast_
    size_t i = 0;
    size_t stop = std::min(n, kMatchChunkBytes);
    for (;; stop = std::min(n, stop + kMatchChunkBytes)) {
        while (i < stop) {
            if (fast < 2) {
                // A run of bytes that each lead to the same one of the two states from either
                // (most letters of a Latin-script text) needs no state threaded through it.
                const size_t start = i;
                while (i < stop && ac_reset_[p[i]] != kAcSlow) ++i;
                if (i != start) fast = ac_reset_[p[i - 1]];
                if (i == stop) break;
            }
            const unsigned char b = p[i];
            const uint8_t next = ac_fast_[fast][b];
            if (next != kAcSlow) {
                fast = next;
                ++i;
                continue;
            }
            if (fast < 2) c = cursor_at(fast == 0 ? 0 : ac_space_state_);
            if (b < 0x80) {
                const uint8_t cls = kByteClass.of[b];
                if (cls == kKeep) {
                    ac_step(c, ac_code(b), found);
                } else if (cls == kSpace) {
                    ac_step(c, ac_space_code_, found);
                } else {
                    ac_step(c, ac_space_code_, found);
                    ac_step(c, ac_code(b), found);
                    ac_step(c, ac_space_code_, found);
                }
                ++i;
            } else {
                // Code points as for_each_code_point gives them (patterns were built with it); the
                // three-byte form (CJK, Thai, Hangul, ...) decoded here, the rest by decode_at.
                uint32_t cp;
                size_t len = 3;
                if ((b & 0xF0) == 0xE0 && i + 2 < n && (p[i + 1] & 0xC0) == 0x80 && (p[i + 2] & 0xC0) == 0x80) {
                    cp = (uint32_t{b & 0x0Fu} << 12) | (uint32_t{p[i + 1] & 0x3Fu} << 6) | (p[i + 2] & 0x3Fu);
                } else {
                    cp = decode_at(p + i, n - i, &len);
                    if (cp == kMalformed) cp += b;
                }
                ac_step(c, ac_code(cp), found);
                i += len;
            }
            fast = c.state == 0 ? 0 : c.state == ac_space_state_ ? 1 : 2;
        }
        if (stop == n) break;
        bound_found(scratch);
    }
    if (fast < 2) c = cursor_at(fast == 0 ? 0 : ac_space_state_);
    ac_step(c, ac_space_code_, found);
}

// Structural checks of a loaded automaton, so a damaged file fails on load rather than
// reading out of bounds or looping: every slot a step can read is inside the arrays,
// every id it reports is an entry, and every failure chain and output run ends.
bool Matcher::ac_checks_out(size_t n_entries) const {
    const size_t n = ac_units_.size(), n_out = ac_outputs_.size();
    if (n == 0 || n > kStateMask || ac_units_[0].check != kNone || (ac_units_[0].fail & kStateMask) != 0 ||
        ac_n_codes_ >= kStateMask || n_out >= static_cast<size_t>(INT32_MAX))
        return false;
    for (uint32_t code : ac_code_bmp_)
        if (code > ac_n_codes_) return false;
    for (size_t i = 0; i < ac_code_rest_.size(); ++i) {
        const uint32_t cp = static_cast<uint32_t>(ac_code_rest_[i] >> 32), code = static_cast<uint32_t>(ac_code_rest_[i]);
        if (cp < 0x10000 || code == 0 || code > ac_n_codes_) return false;
        if (i > 0 && (ac_code_rest_[i - 1] >> 32) >= cp) return false;  // sorted, one code each
    }
    const auto is_state = [&](uint32_t s) { return s < n && (s == 0 || ac_units_[s].check != kNone); };
    for (size_t i = 0; i < n; ++i) {
        const AcUnit& u = ac_units_[i];
        if (i != 0 && u.check == kNone) continue;  // a free slot: only its check is ever read
        if ((i != 0 && !is_state(u.check)) || !is_state(u.fail & kStateMask)) return false;
        if ((u.fail & ~(kLeaf | kStateMask)) != 0) return false;
        if (!(u.fail & kLeaf) && uint64_t{u.base} + ac_n_codes_ >= n) return false;
        if (u.report < -1 || u.report >= static_cast<int64_t>(n_out)) return false;
    }
    if (n_out > 0 && ac_outputs_.back() >= 0) return false;  // a run may not run off the end
    for (int32_t v : ac_outputs_)
        if (v >= static_cast<int64_t>(n_entries) || (v < kOutputsEnd && static_cast<size_t>(-(v + 2)) >= n_out)) return false;
    // Each chain is walked until it meets a node already known to end it.
    const auto chains_end = [](size_t count, auto next, uint32_t end) {
        std::vector<uint8_t> ends(count, 0);
        std::vector<uint32_t> path;
        for (size_t i = 0; i < count; ++i) {
            path.clear();
            uint32_t x = static_cast<uint32_t>(i);
            while (x != end && !ends[x]) {
                if (path.size() > count) return false;
                path.push_back(x);
                x = next(x);
            }
            for (uint32_t p : path) ends[p] = 1;
        }
        return true;
    };
    const auto fail_of = [&](uint32_t s) { return s == 0 || !is_state(s) ? 0u : ac_units_[s].fail & kStateMask; };
    const auto run_next = [&](uint32_t at) {
        const int32_t v = ac_outputs_[at];
        return v >= 0 ? at + 1 : v == kOutputsEnd ? kNone : static_cast<uint32_t>(-(v + 2));
    };
    return chains_end(n, fail_of, 0) && chains_end(n_out, run_next, kNone);
}

std::string_view Matcher::entry(size_t id) const {
    if (id >= size()) throw std::out_of_range("entry id out of range");
    return std::string_view(entry_bytes_).substr(entry_offsets_[id], entry_offsets_[id + 1] - entry_offsets_[id]);
}

void Matcher::insert_slot(std::vector<VocabSlot>& table, const VocabSlot& slot, uint64_t hash) {
    size_t mask = table.size() - 1;
    size_t i = hash & mask;
    while (table[i].id_plus1 != 0) i = (i + 1) & mask;
    table[i] = slot;
}

uint32_t Matcher::add_token(std::string_view token) {
    uint64_t h = hash_bytes(token.data(), token.size(), 0);
    int32_t found = token.size() <= max_token_size_ ? token_id(token.data(), token.size(), h) : -1;
    if (found >= 0) return static_cast<uint32_t>(found);
    uint32_t id = static_cast<uint32_t>(token_offsets_.size() - 1);
    token_bytes_.append(token);
    token_offsets_.push_back(token_bytes_.size());
    max_token_size_ = std::max<uint32_t>(max_token_size_, static_cast<uint32_t>(token.size()));
    if ((uint64_t{id} + 1) * 2 > vocab_slots_.size()) {
        std::vector<VocabSlot> bigger(vocab_slots_.size() * 2, VocabSlot{0, 0, 0});
        for (const VocabSlot& s : vocab_slots_) {
            if (s.id_plus1 == 0) continue;
            uint32_t t = s.id_plus1 - 1;
            insert_slot(bigger, s, hash_bytes(token_bytes_.data() + token_offsets_[t], token_offsets_[t + 1] - token_offsets_[t], 0));
        }
        vocab_slots_.swap(bigger);
    }
    insert_slot(vocab_slots_, VocabSlot{load_le(reinterpret_cast<const unsigned char*>(token.data()), std::min<size_t>(token.size(), 8)), slot_meta(h, token.size()), id + 1}, h);
    return id;
}

void Matcher::add_edge(uint32_t node, uint32_t token, uint32_t target) {
    edge_insert(edges_, edge_count_, node, token, target);
}

// --- look-ups ----------------------------------------------------------------------

int32_t Matcher::token_id(const char* data, size_t size, uint64_t hash) const {
    const uint64_t prefix = load_le(reinterpret_cast<const unsigned char*>(data), std::min<size_t>(size, 8));
    const uint32_t meta = slot_meta(hash, size);
    const size_t mask = vocab_slots_.size() - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        const VocabSlot& s = vocab_slots_[i];
        if (s.id_plus1 == 0) return -1;
        if (s.meta != meta || s.prefix != prefix) continue;
        const uint32_t id = s.id_plus1 - 1;
        if (size <= 8) return static_cast<int32_t>(id);  // size and all bytes are in the slot
        const uint64_t begin = token_offsets_[id], end = token_offsets_[id + 1];
        if (end - begin == size && equal_bytes(token_bytes_.data() + begin + 8, data + 8, size - 8))
            return static_cast<int32_t>(id);
    }
}

uint32_t Matcher::child(uint32_t node, uint32_t token) const {
    static_assert(kNone == UINT32_MAX, "edge_find reports a missing edge as kNone");
    return edge_find(edges_, node, token);
}

namespace {

// Ascending and unique, in place, `spare` as working memory. Sorting a text's ids was a
// quarter of matching CJK text, most of it branch mispredictions (the ids arrive in no
// useful order; an insertion sort below 64 ids and std::sort above), so both ways here
// are branch-free in their inner loops: up to 32 ids (the usual text) are placed by rank,
// each id's count of smaller ones, all pairs compared with SIMD; more by an LSD radix sort
// on bytes. On the CJK benchmark's id lists: 13.5 -> about 7 ms per 17,698 texts.
void sort_unique(std::vector<int32_t>& ids, std::vector<int32_t>& spare) {
    const size_t n = ids.size();
    if (n < 2) return;
    if (spare.size() < n) spare.resize(std::max(n, 2 * spare.size()));
    int32_t* a = ids.data();
    int32_t* b = spare.data();
    if (n <= 32) {
        for (size_t i = 0; i < n; ++i) {
            const int32_t v = a[i];
            uint32_t rank = 0;
            for (size_t j = 0; j < n; ++j) rank += a[j] < v;
            for (size_t j = 0; j < i; ++j) rank += a[j] == v;  // equal ids: distinct ranks, in order
            b[rank] = v;
        }
    } else {
        // Ids are non-negative; as many byte passes as the largest needs, all their counts
        // taken in one read of the ids.
        int32_t top = 0;
        for (size_t i = 0; i < n; ++i) top = std::max(top, a[i]);
        int passes = 1;
        while (passes < 4 && (static_cast<uint32_t>(top) >> (8 * passes)) != 0) ++passes;
        uint32_t count[4][257];
        std::memset(count, 0, sizeof count[0] * passes);
        for (size_t i = 0; i < n; ++i)
            for (int pass = 0; pass < passes; ++pass) ++count[pass][((static_cast<uint32_t>(a[i]) >> (8 * pass)) & 0xFF) + 1];
        for (int pass = 0; pass < passes; ++pass) {
            uint32_t* at = count[pass];
            for (size_t d = 0; d < 256; ++d) at[d + 1] += at[d];
            for (size_t i = 0; i < n; ++i) b[at[(static_cast<uint32_t>(a[i]) >> (8 * pass)) & 0xFF]++] = a[i];
            std::swap(a, b);
        }
        std::swap(a, b);  // the sorted ids are in b, as after the rank placement
    }
    // Repeats are adjacent now: keep the first of each, without a branch per id (b may be
    // ids itself: each write lands at or before the read that feeds it).
    int32_t* out = ids.data();
    int32_t last = b[0];
    out[0] = last;
    size_t kept = 1;
    for (size_t i = 1; i < n; ++i) {
        const int32_t v = b[i];
        out[kept] = v;
        kept += v != last;
        last = v;
    }
    ids.resize(kept);
}

// Between the chunks of a long text: once the ids found outgrow their limit they are
// deduplicated, and the limit becomes twice what is left, so that the ids held stay about
// the text's distinct entries rather than one per occurrence, at an amortised cost of a
// constant per id found.
void bound_found(MatchScratch& scratch) {
    if (scratch.found.size() <= scratch.found_limit) return;
    sort_unique(scratch.found, scratch.sorted);
    scratch.found_limit = std::max(scratch.found_limit, 2 * scratch.found.size());
}

}  // namespace

void Matcher::match(std::string_view text, std::vector<int32_t>& out, MatchScratch& scratch) const {
    const bool v2 = semantics_ == Semantics::kMetaclip2;
    if (v2) text = strip_python_whitespace(text);

    auto& found = scratch.found;
    found.clear();
    scratch.found_limit = size_t{1} << 16;
    if (token_offsets_.size() > 1) match_tokens(text, scratch);  // no trie entries: nothing to look up
    if (v2 && ac_active_) match_automaton(text, scratch);
    sort_unique(found, scratch.sorted);
    out.insert(out.end(), found.begin(), found.end());
}

// A text is matched in chunks that end just after a space-like or punctuation byte, a
// token boundary: the tokens of the text are those of its chunks (less the empty token
// each chunk but the last ends with), and a trie walk still going at a chunk's end goes
// on into the next one (scratch.carry). Texts up to kMatchChunkBytes are one chunk.
void Matcher::match_tokens(std::string_view text, MatchScratch& scratch) const {
    scratch.carry.clear();
    const char* p = text.data();
    size_t begin = 0;
    for (;;) {
        size_t end = text.size();
        if (end - begin > kMatchChunkBytes) {
            size_t j = begin + kMatchChunkBytes - 1;
            while (j < end && kByteClass.of[static_cast<unsigned char>(p[j])] == kKeep) ++j;
            if (j < end) end = j + 1;
        }
        const bool last = end == text.size();
        match_token_chunk(text.substr(begin, end - begin), last, scratch);
        if (last) return;
        bound_found(scratch);
        begin = end;
    }
}

void Matcher::match_token_chunk(std::string_view chunk, bool last, MatchScratch& scratch) const {
    // Short passes instead of one: hashing every token first lets the memory system
    // fetch all their vocabulary slots at once (prefetch) rather than one by one; the
    // same then goes for their trie nodes, and for the trie edges to the next token.
    // The buffers only grow, to at most 2 * kMatchChunkBytes + 1 tokens (a chunk has at
    // most 2 * separators + 1 tokens, and its separators all lie in its first
    // kMatchChunkBytes bytes but the one that ends it), so no pass checks capacity per token.
    auto& tokens = scratch.tokens;
    auto& ids = scratch.token_ids;
    const size_t most = 2 * std::min(chunk.size(), kMatchChunkBytes) + 1;
    if (tokens.size() < most) {
        tokens.resize(most);
        ids.resize(most);
    }
    MatchScratch::Token* tok = tokens.data();
    size_t n_tokens = 0;
    const size_t mask = vocab_slots_.size() - 1;
    for_each_spaced_token(chunk, [&](const char* p, size_t n) {
        if (n > max_token_size_) {
            tok[n_tokens++] = {nullptr, 0, 0};  // cannot be in the vocabulary
            return;
        }
        const uint64_t h = hash_token(p, n);
        __builtin_prefetch(&vocab_slots_[h & mask]);
        tok[n_tokens++] = {p, static_cast<uint32_t>(n), h};
    });
    if (!last) --n_tokens;  // the empty token after the separator that ends the chunk
    int32_t* id = ids.data();
    for (size_t i = 0; i < n_tokens; ++i) {
        id[i] = tok[i].data == nullptr ? -1 : token_id(tok[i].data, tok[i].size, tok[i].hash);
        if (id[i] >= 0) __builtin_prefetch(&node_info_[id[i]]);
    }
    // Most texts' tokens start some multi-token entry (a bigram list makes nearly every
    // word one): the edge to the next token is a probe into a large table, so fetch it now.
    const size_t edge_mask = edges_.size() - 1;
    for (size_t i = 0; i + 1 < n_tokens; ++i) {
        if (id[i] >= 0 && id[i + 1] >= 0 && (node_info_[id[i]] & kHasChildren))
            __builtin_prefetch(&edges_[mix64(edge_key(static_cast<uint32_t>(id[i]), static_cast<uint32_t>(id[i + 1]))) & edge_mask]);
    }

    auto& found = scratch.found;
    auto& carry = scratch.next_carry;
    carry.clear();
    // Walks from the previous chunk: their nodes were reported there and have children.
    for (uint32_t node : scratch.carry) {
        for (size_t j = 0;; ++j) {
            if (j == n_tokens) {
                if (!last) carry.push_back(node);
                break;
            }
            if (id[j] < 0) break;
            node = child(node, static_cast<uint32_t>(id[j]));
            if (node == kNone) break;
            const uint32_t info = node_info_[node];
            for (int32_t e = static_cast<int32_t>(info & ~kHasChildren) - 1; e >= 0; e = next_same_entry_[e])
                found.push_back(e);
            if (!(info & kHasChildren)) break;
        }
    }
    for (size_t i = 0; i < n_tokens; ++i) {
        if (id[i] < 0) continue;
        uint32_t node = static_cast<uint32_t>(id[i]);
        for (size_t j = i + 1;; ++j) {
            const uint32_t info = node_info_[node];
            for (int32_t e = static_cast<int32_t>(info & ~kHasChildren) - 1; e >= 0; e = next_same_entry_[e])
                found.push_back(e);
            if (j == n_tokens || id[j] < 0 || !(info & kHasChildren)) {
                if (!last && j == n_tokens && (info & kHasChildren)) carry.push_back(node);
                break;
            }
            node = child(node, static_cast<uint32_t>(id[j]));
            if (node == kNone) break;
        }
    }
    scratch.carry.swap(carry);
}

void Matcher::match_batch(const std::vector<std::string_view>& texts, int threads,
                          std::vector<int64_t>& offsets, std::vector<int32_t>& ids) const {
    const size_t n = texts.size();
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    // Blocks are handed out dynamically so a thread that draws long texts does not
    // hold the others up; each block's ids are stitched together in order afterwards.
    constexpr size_t kBlock = 2048;
    const size_t n_blocks = (n + kBlock - 1) / kBlock;
    threads = static_cast<int>(std::min<size_t>(static_cast<size_t>(threads), std::max<size_t>(n_blocks, 1)));

    std::vector<std::vector<int32_t>> block_ids(n_blocks);
    offsets.assign(n + 1, 0);
    std::atomic<size_t> next_block{0};
    auto worker = [&]() {
        MatchScratch scratch;
        for (size_t b = next_block++; b < n_blocks; b = next_block++) {
            const size_t begin = b * kBlock, end = std::min(n, begin + kBlock);
            auto& out = block_ids[b];
            for (size_t i = begin; i < end; ++i) {
                size_t before = out.size();
                match(texts[i], out, scratch);
                offsets[i + 1] = static_cast<int64_t>(out.size() - before);  // count for now
            }
        }
    };
    if (threads == 1) {
        worker();
    } else {
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
        for (auto& th : pool) th.join();
    }
    for (size_t i = 0; i < n; ++i) offsets[i + 1] += offsets[i];
    ids.resize(static_cast<size_t>(offsets[n]));
    size_t pos = 0;
    for (auto& block : block_ids) {
        std::copy(block.begin(), block.end(), ids.begin() + static_cast<std::ptrdiff_t>(pos));
        pos += block.size();
        std::vector<int32_t>().swap(block);
    }
}

// --- persistence -------------------------------------------------------------------

void Matcher::save(std::ostream& out) const {
    const char* magic = semantics_ == Semantics::kMetaclip1 ? kMagic : kMagic2;
    out.write(magic, sizeof kMagic);
    write_str(out, entry_bytes_);
    write_vec(out, entry_offsets_);
    write_str(out, token_bytes_);
    write_vec(out, token_offsets_);
    write_vec(out, vocab_slots_);
    out.write(reinterpret_cast<const char*>(&max_token_size_), sizeof max_token_size_);
    write_vec(out, node_info_);
    write_vec(out, edges_);
    out.write(reinterpret_cast<const char*>(&edge_count_), sizeof edge_count_);
    write_vec(out, next_same_entry_);
    if (semantics_ != Semantics::kMetaclip1) {
        const uint8_t sem = static_cast<uint8_t>(semantics_);
        out.write(reinterpret_cast<const char*>(&sem), sizeof sem);
        write_vec(out, ac_units_);
        write_vec(out, ac_outputs_);
        write_vec(out, ac_code_bmp_);
        write_vec(out, ac_code_rest_);
        out.write(reinterpret_cast<const char*>(&ac_n_codes_), sizeof ac_n_codes_);
    }
    out.write(magic, sizeof kMagic);  // trailer: a cut-off file is caught on load
    if (!out) throw std::runtime_error("could not write matcher");
}

Matcher Matcher::load(std::istream& in) {
    char magic[sizeof kMagic];
    in.read(magic, sizeof magic);
    const bool v2 = in && std::memcmp(magic, kMagic2, sizeof kMagic2) == 0;
    if (in && std::memcmp(magic, kMagic2Old, sizeof kMagic2Old) == 0)
        throw std::runtime_error("matcher file written by an older mode-fast (metaclip2 hash-table layout): build it again");
    if (!in || (!v2 && std::memcmp(magic, kMagic, sizeof kMagic) != 0))
        throw std::runtime_error("not a mode-fast matcher file (bad magic)");
    const char* expected = v2 ? kMagic2 : kMagic;
    constexpr uint64_t kMax = uint64_t{1} << 40;
    Matcher m;
    read_str(in, m.entry_bytes_, kMax);
    read_vec(in, m.entry_offsets_, kMax);
    read_str(in, m.token_bytes_, kMax);
    read_vec(in, m.token_offsets_, kMax);
    read_vec(in, m.vocab_slots_, kMax);
    read_pod(in, m.max_token_size_);
    read_vec(in, m.node_info_, kMax);
    read_vec(in, m.edges_, kMax);
    read_pod(in, m.edge_count_);
    read_vec(in, m.next_same_entry_, kMax);
    if (v2) {
        uint8_t sem = 0;
        read_pod(in, sem);
        if (sem != static_cast<uint8_t>(Semantics::kMetaclip2)) throw std::runtime_error("matcher file is corrupt (unknown semantics)");
        m.semantics_ = Semantics::kMetaclip2;
        read_vec(in, m.ac_units_, kMax);
        read_vec(in, m.ac_outputs_, kMax);
        read_vec(in, m.ac_code_bmp_, 0x10000);
        read_vec(in, m.ac_code_rest_, kMax);
        read_pod(in, m.ac_n_codes_);
    }
    in.read(magic, sizeof magic);
    if (!in || std::memcmp(magic, expected, sizeof kMagic) != 0)
        throw std::runtime_error("matcher file is truncated or corrupt (bad trailer)");

    // Structural checks, so a damaged file fails here rather than reading out of bounds.
    const size_t n_entries = m.entry_offsets_.empty() ? 0 : m.entry_offsets_.size() - 1;
    const size_t n_tokens = m.token_offsets_.empty() ? 0 : m.token_offsets_.size() - 1;
    const size_t n_nodes = m.node_info_.size();
    auto pow2 = [](size_t x) { return x > 0 && (x & (x - 1)) == 0; };
    bool ok = !m.entry_offsets_.empty() && m.entry_offsets_.back() == m.entry_bytes_.size() &&
              !m.token_offsets_.empty() && m.token_offsets_.back() == m.token_bytes_.size() &&
              pow2(m.vocab_slots_.size()) && pow2(m.edges_.size()) && n_nodes >= n_tokens &&
              m.next_same_entry_.size() == n_entries;
    for (size_t i = 0; ok && i + 1 < m.entry_offsets_.size(); ++i) ok = m.entry_offsets_[i] <= m.entry_offsets_[i + 1];
    for (size_t i = 0; ok && i + 1 < m.token_offsets_.size(); ++i) ok = m.token_offsets_[i] <= m.token_offsets_[i + 1];
    for (const VocabSlot& s : m.vocab_slots_) ok = ok && s.id_plus1 <= n_tokens;
    for (const Edge& e : m.edges_) ok = ok && (e.key == kEmptyKey || e.target < n_nodes);
    for (uint32_t info : m.node_info_) ok = ok && (info & ~kHasChildren) <= n_entries;
    // Duplicate chains run to higher ids (entries are added in id order), so they end.
    for (size_t i = 0; ok && i < n_entries; ++i)
        ok = m.next_same_entry_[i] == -1 || (m.next_same_entry_[i] > static_cast<int64_t>(i) && m.next_same_entry_[i] < static_cast<int64_t>(n_entries));
    if (v2) {
        ok = ok && m.ac_checks_out(n_entries);
    }
    if (!ok) throw std::runtime_error("matcher file is corrupt (inconsistent tables)");
    if (v2) m.index_fast_paths();  // derived tables, built by walking the now validated automaton
    return m;
}

}  // namespace modefast
