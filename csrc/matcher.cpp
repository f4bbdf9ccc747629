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

// Little-endian load regardless of the host's byte order, so hashes are portable.
inline uint64_t load_le(const unsigned char* p, size_t n) {
    uint64_t w = 0;
    for (size_t i = 0; i < n; ++i) w |= uint64_t{p[i]} << (8 * i);
    return w;
}

inline uint64_t mix64(uint64_t x) {
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

// spaced(text) without its two padding spaces: the padding only makes the first
// and last tokens bounded, which splitting on ' ' already gives.
void normalize(std::string_view text, std::string& out) {
    out.clear();
    out.reserve(text.size() + 16);
    for (char c : text) {
        if (is_wrapped_punct(c)) {
            out.push_back(' ');
            out.push_back(c);
            out.push_back(' ');
        } else if (c == '\t' || c == '\n' || c == '\r') {
            out.push_back(' ');
        } else {
            out.push_back(c);
        }
    }
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

size_t table_size_for(size_t items) {
    size_t size = 16;
    while (size < items * 2) size <<= 1;  // load factor <= 0.5 keeps misses short
    return size;
}

// --- binary file helpers -------------------------------------------------------
constexpr char kMagic[8] = {'M', 'F', 'M', 'A', 'T', 'C', 'H', '1'};

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

// --- construction ----------------------------------------------------------------

Matcher::Matcher(const std::vector<std::string>& entries) {
    if (entries.size() >= static_cast<size_t>(INT32_MAX))
        throw std::invalid_argument("too many entries (ids are int32)");
    entry_offsets_.reserve(entries.size() + 1);
    entry_offsets_.push_back(0);
    size_t total = 0;
    for (const auto& e : entries) total += e.size();
    entry_bytes_.reserve(total);
    // Rough token count sizes the tables once instead of rehashing while building.
    vocab_slots_.assign(table_size_for(entries.size() + 1), 0);
    edge_keys_.assign(table_size_for(entries.size() / 2 + 1), kEmptyKey);
    edge_targets_.assign(edge_keys_.size(), 0);
    next_same_entry_.assign(entries.size(), -1);

    std::vector<int32_t> last_of_node;  // tail of each node's duplicate chain
    std::vector<uint32_t> tokens;
    for (size_t id = 0; id < entries.size(); ++id) {
        const std::string& e = entries[id];
        entry_bytes_.append(e);
        entry_offsets_.push_back(entry_bytes_.size());

        tokens.clear();
        for_each_token(e, [&](const char* p, size_t n) { tokens.push_back(add_token({p, n})); });

        uint32_t node = root_child_[tokens[0]];
        if (node == kNone) {
            node = static_cast<uint32_t>(node_entry_.size());
            root_child_[tokens[0]] = node;
            node_entry_.push_back(-1);
            node_has_children_.push_back(0);
            last_of_node.push_back(-1);
        }
        for (size_t k = 1; k < tokens.size(); ++k) {
            uint32_t next = child(node, tokens[k]);
            if (next == kNone) {
                next = static_cast<uint32_t>(node_entry_.size());
                node_entry_.push_back(-1);
                node_has_children_.push_back(0);
                last_of_node.push_back(-1);
                add_edge(node, tokens[k], next);
                node_has_children_[node] = 1;
            }
            node = next;
        }
        // Duplicate entries are legal input and all their ids are reported, as the
        // naive reference does; they are chained so the common case stays one int.
        if (node_entry_[node] < 0) {
            node_entry_[node] = static_cast<int32_t>(id);
        } else {
            next_same_entry_[last_of_node[node]] = static_cast<int32_t>(id);
        }
        last_of_node[node] = static_cast<int32_t>(id);
    }
}

std::string_view Matcher::entry(size_t id) const {
    if (id >= size()) throw std::out_of_range("entry id out of range");
    return std::string_view(entry_bytes_).substr(entry_offsets_[id], entry_offsets_[id + 1] - entry_offsets_[id]);
}

uint32_t Matcher::add_token(std::string_view token) {
    int32_t found = token_id(token.data(), token.size());
    if (found >= 0) return static_cast<uint32_t>(found);
    uint32_t id = static_cast<uint32_t>(token_offsets_.size() - 1);
    token_bytes_.append(token);
    token_offsets_.push_back(token_bytes_.size());
    max_token_size_ = std::max<uint32_t>(max_token_size_, static_cast<uint32_t>(token.size()));
    root_child_.push_back(kNone);
    if ((uint64_t{id} + 1) * 2 > vocab_slots_.size()) grow_vocab_table();
    uint64_t h = hash_bytes(token.data(), token.size(), 0);
    size_t mask = vocab_slots_.size() - 1;
    size_t slot = h & mask;
    while (vocab_slots_[slot] != 0) slot = (slot + 1) & mask;
    vocab_slots_[slot] = (h & 0xFFFFFFFF00000000ull) | (uint64_t{id} + 1);
    return id;
}

void Matcher::grow_vocab_table() {
    std::vector<uint64_t> old;
    old.swap(vocab_slots_);
    vocab_slots_.assign(old.size() * 2, 0);
    size_t mask = vocab_slots_.size() - 1;
    for (uint64_t s : old) {
        if (s == 0) continue;
        uint32_t id = static_cast<uint32_t>(s & 0xFFFFFFFFu) - 1;
        uint64_t h = hash_bytes(token_bytes_.data() + token_offsets_[id], token_offsets_[id + 1] - token_offsets_[id], 0);
        size_t slot = h & mask;
        while (vocab_slots_[slot] != 0) slot = (slot + 1) & mask;
        vocab_slots_[slot] = s;
    }
}

void Matcher::add_edge(uint32_t node, uint32_t token, uint32_t target) {
    if ((edge_count_ + 1) * 2 > edge_keys_.size()) grow_edge_table();
    uint64_t key = edge_key(node, token);
    size_t mask = edge_keys_.size() - 1;
    size_t slot = mix64(key) & mask;
    while (edge_keys_[slot] != kEmptyKey) slot = (slot + 1) & mask;
    edge_keys_[slot] = key;
    edge_targets_[slot] = target;
    ++edge_count_;
}

void Matcher::grow_edge_table() {
    std::vector<uint64_t> old_keys;
    std::vector<uint32_t> old_targets;
    old_keys.swap(edge_keys_);
    old_targets.swap(edge_targets_);
    edge_keys_.assign(old_keys.size() * 2, kEmptyKey);
    edge_targets_.assign(edge_keys_.size(), 0);
    size_t mask = edge_keys_.size() - 1;
    for (size_t i = 0; i < old_keys.size(); ++i) {
        if (old_keys[i] == kEmptyKey) continue;
        size_t slot = mix64(old_keys[i]) & mask;
        while (edge_keys_[slot] != kEmptyKey) slot = (slot + 1) & mask;
        edge_keys_[slot] = old_keys[i];
        edge_targets_[slot] = old_targets[i];
    }
}

// --- look-ups ----------------------------------------------------------------------

int32_t Matcher::token_id(const char* data, size_t size) const {
    if (size > max_token_size_ || vocab_slots_.empty()) return -1;
    uint64_t h = hash_bytes(data, size, 0);
    uint64_t tag = h & 0xFFFFFFFF00000000ull;
    size_t mask = vocab_slots_.size() - 1;
    for (size_t slot = h & mask;; slot = (slot + 1) & mask) {
        uint64_t s = vocab_slots_[slot];
        if (s == 0) return -1;
        if ((s & 0xFFFFFFFF00000000ull) == tag) {
            uint32_t id = static_cast<uint32_t>(s & 0xFFFFFFFFu) - 1;
            uint64_t begin = token_offsets_[id], end = token_offsets_[id + 1];
            if (end - begin == size && std::memcmp(token_bytes_.data() + begin, data, size) == 0)
                return static_cast<int32_t>(id);
        }
    }
}

uint32_t Matcher::child(uint32_t node, uint32_t token) const {
    uint64_t key = edge_key(node, token);
    size_t mask = edge_keys_.size() - 1;
    for (size_t slot = mix64(key) & mask;; slot = (slot + 1) & mask) {
        uint64_t k = edge_keys_[slot];
        if (k == key) return edge_targets_[slot];
        if (k == kEmptyKey) return kNone;
    }
}

void Matcher::match(std::string_view text, std::vector<int32_t>& out, MatchScratch& scratch) const {
    normalize(text, scratch.normalized);
    auto& ids = scratch.token_ids;
    ids.clear();
    for_each_token(scratch.normalized, [&](const char* p, size_t n) { ids.push_back(token_id(p, n)); });

    auto& found = scratch.found;
    found.clear();
    const size_t n_tokens = ids.size();
    for (size_t i = 0; i < n_tokens; ++i) {
        if (ids[i] < 0) continue;
        uint32_t node = root_child_[ids[i]];
        for (size_t j = i + 1;; ++j) {
            if (node == kNone) break;
            for (int32_t e = node_entry_[node]; e >= 0; e = next_same_entry_[e]) found.push_back(e);
            if (j == n_tokens || ids[j] < 0 || !node_has_children_[node]) break;
            node = child(node, static_cast<uint32_t>(ids[j]));
        }
    }
    if (found.size() > 1) {
        std::sort(found.begin(), found.end());
        found.erase(std::unique(found.begin(), found.end()), found.end());
    }
    out.insert(out.end(), found.begin(), found.end());
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
    out.write(kMagic, sizeof kMagic);
    write_str(out, entry_bytes_);
    write_vec(out, entry_offsets_);
    write_str(out, token_bytes_);
    write_vec(out, token_offsets_);
    write_vec(out, vocab_slots_);
    out.write(reinterpret_cast<const char*>(&max_token_size_), sizeof max_token_size_);
    write_vec(out, root_child_);
    write_vec(out, edge_keys_);
    write_vec(out, edge_targets_);
    out.write(reinterpret_cast<const char*>(&edge_count_), sizeof edge_count_);
    write_vec(out, node_entry_);
    write_vec(out, node_has_children_);
    write_vec(out, next_same_entry_);
    out.write(kMagic, sizeof kMagic);  // trailer: a cut-off file is caught on load
    if (!out) throw std::runtime_error("could not write matcher");
}

Matcher Matcher::load(std::istream& in) {
    char magic[sizeof kMagic];
    in.read(magic, sizeof magic);
    if (!in || std::memcmp(magic, kMagic, sizeof kMagic) != 0)
        throw std::runtime_error("not a mode-fast matcher file (bad magic)");
    constexpr uint64_t kMax = uint64_t{1} << 40;
    Matcher m;
    read_str(in, m.entry_bytes_, kMax);
    read_vec(in, m.entry_offsets_, kMax);
    read_str(in, m.token_bytes_, kMax);
    read_vec(in, m.token_offsets_, kMax);
    read_vec(in, m.vocab_slots_, kMax);
    read_pod(in, m.max_token_size_);
    read_vec(in, m.root_child_, kMax);
    read_vec(in, m.edge_keys_, kMax);
    read_vec(in, m.edge_targets_, kMax);
    read_pod(in, m.edge_count_);
    read_vec(in, m.node_entry_, kMax);
    read_vec(in, m.node_has_children_, kMax);
    read_vec(in, m.next_same_entry_, kMax);
    in.read(magic, sizeof magic);
    if (!in || std::memcmp(magic, kMagic, sizeof kMagic) != 0)
        throw std::runtime_error("matcher file is truncated or corrupt (bad trailer)");

    // Structural checks, so a damaged file fails here rather than reading out of bounds.
    const size_t n_entries = m.entry_offsets_.empty() ? 0 : m.entry_offsets_.size() - 1;
    const size_t n_tokens = m.token_offsets_.empty() ? 0 : m.token_offsets_.size() - 1;
    const size_t n_nodes = m.node_entry_.size();
    auto pow2 = [](size_t x) { return x > 0 && (x & (x - 1)) == 0; };
    bool ok = !m.entry_offsets_.empty() && m.entry_offsets_.back() == m.entry_bytes_.size() &&
              !m.token_offsets_.empty() && m.token_offsets_.back() == m.token_bytes_.size() &&
              pow2(m.vocab_slots_.size()) && pow2(m.edge_keys_.size()) &&
              m.edge_targets_.size() == m.edge_keys_.size() && m.root_child_.size() == n_tokens &&
              m.node_has_children_.size() == n_nodes && m.next_same_entry_.size() == n_entries;
    for (size_t i = 0; ok && i + 1 < m.entry_offsets_.size(); ++i) ok = m.entry_offsets_[i] <= m.entry_offsets_[i + 1];
    for (size_t i = 0; ok && i + 1 < m.token_offsets_.size(); ++i) ok = m.token_offsets_[i] <= m.token_offsets_[i + 1];
    for (uint64_t s : m.vocab_slots_) ok = ok && (s == 0 || (s & 0xFFFFFFFFu) <= n_tokens);
    for (uint32_t c : m.root_child_) ok = ok && (c == kNone || c < n_nodes);
    for (size_t i = 0; ok && i < m.edge_keys_.size(); ++i)
        ok = m.edge_keys_[i] == kEmptyKey || m.edge_targets_[i] < n_nodes;
    for (int32_t e : m.node_entry_) ok = ok && e < static_cast<int64_t>(n_entries);
    for (int32_t e : m.next_same_entry_) ok = ok && e < static_cast<int64_t>(n_entries);
    if (!ok) throw std::runtime_error("matcher file is corrupt (inconsistent tables)");
    return m;
}

}  // namespace modefast
