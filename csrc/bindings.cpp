// Python bindings for the matcher: the only file here that knows about Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "matcher.h"

namespace py = pybind11;
using modefast::Matcher;
using modefast::Semantics;

namespace {

// UTF-8 view of a str (cached inside the str object, no copy for ASCII) or of bytes.
// With `surrogates`, a str holding lone surrogates is encoded with surrogatepass into
// a new bytes object kept in *keep (MetaCLIP 2 matches such text on its other
// characters); without, it is an error.
std::string_view utf8_view(PyObject* obj, const char* what, size_t index, py::object* keep = nullptr) {
    if (PyUnicode_Check(obj)) {
        Py_ssize_t size = 0;
        const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
        if (data == nullptr) {
            PyErr_Clear();
            if (keep != nullptr) {
                PyObject* encoded = PyUnicode_AsEncodedString(obj, "utf-8", "surrogatepass");
                if (encoded == nullptr) throw py::error_already_set();
                *keep = py::reinterpret_steal<py::object>(encoded);
                return {PyBytes_AS_STRING(encoded), static_cast<size_t>(PyBytes_GET_SIZE(encoded))};
            }
            throw py::value_error(std::string(what) + " at index " + std::to_string(index) +
                                  " is not encodable as UTF-8 (lone surrogate?)");
        }
        return {data, static_cast<size_t>(size)};
    }
    if (PyBytes_Check(obj)) return {PyBytes_AS_STRING(obj), static_cast<size_t>(PyBytes_GET_SIZE(obj))};
    throw py::type_error(std::string(what) + " at index " + std::to_string(index) + " must be str, not " +
                         Py_TYPE(obj)->tp_name);
}

// Holds strong references so the texts outlive the GIL-free section even if the
// caller's list is changed by another thread meanwhile.
struct TextViews {
    std::vector<py::object> owners;
    std::vector<std::string_view> views;
};

TextViews collect_texts(const py::handle& seq, const char* what, bool surrogates = false) {
    if (PyUnicode_Check(seq.ptr()) || PyBytes_Check(seq.ptr()))
        throw py::type_error(std::string("expected a sequence of ") + what + "s, got a single string");
    py::sequence items = py::reinterpret_borrow<py::sequence>(seq);
    TextViews t;
    const size_t n = items.size();
    t.owners.reserve(n);
    t.views.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        t.owners.push_back(items[i]);
        py::object encoded;
        t.views.push_back(utf8_view(t.owners.back().ptr(), what, i, surrogates ? &encoded : nullptr));
        if (encoded) t.owners.back() = std::move(encoded);  // the view points into it
    }
    return t;
}

template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
    auto* heap = new std::vector<T>(std::move(v));
    py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
    return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                          heap->data(), owner);
}

Semantics parse_semantics(const std::string& name) {
    if (name == "metaclip1") return Semantics::kMetaclip1;
    if (name == "metaclip2") return Semantics::kMetaclip2;
    throw py::value_error("semantics must be 'metaclip1' or 'metaclip2', not '" + name + "'");
}

const char* semantics_name(Semantics s) { return s == Semantics::kMetaclip2 ? "metaclip2" : "metaclip1"; }

std::unique_ptr<Matcher> build(const py::handle& entries, const std::string& semantics) {
    const Semantics sem = parse_semantics(semantics);
    TextViews t = collect_texts(entries, "entry");
    std::vector<std::string> copies(t.views.begin(), t.views.end());
    py::gil_scoped_release release;
    try {
        return std::make_unique<Matcher>(copies, sem);
    } catch (const std::invalid_argument& e) {
        throw py::value_error(e.what());
    }
}

bool takes_surrogates(const Matcher& m) { return m.semantics() == Semantics::kMetaclip2; }

std::unique_ptr<Matcher> load_file(const std::string& path) {
    py::gil_scoped_release release;
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open matcher file: " + path);
    try {
        return std::make_unique<Matcher>(Matcher::load(in));
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(path + ": " + e.what());
    }
}

// Serialised here and written by mode_fast.core.files, the project's one atomic writer (a
// temporary name its cleanup finds, fsync, the umask's mode, an OutputError naming the
// path), so the matcher file follows the same rules as every other output.
void save_file(const Matcher& m, const py::object& path) {
    std::string data;
    {
        py::gil_scoped_release release;
        std::ostringstream out(std::ios::binary);
        m.save(out);
        data = out.str();
    }
    py::module_::import("mode_fast.core.files").attr("write_bytes")(path, py::bytes(data));
}

py::str decode(std::string_view s) { return py::str(s.data(), s.size()); }

}  // namespace

PYBIND11_MODULE(_matcher, m) {
    m.doc() = "MetaCLIP substring matcher (C++ core of mode_fast.curate.Matcher)";
    m.attr("FILE_FORMAT") = modefast::kFileFormat;

    py::class_<Matcher>(m, "Matcher", R"doc(
MetaCLIP substring matcher over a metadata list.

``semantics="metaclip2"`` follows MetaCLIP 2 (worldwide): the text is stripped first,
an entry gets its padding space only on a side whose edge character is not CJK, Thai,
Lao, Burmese, Khmer, Tibetan or punctuation (ASCII or full-width), and a str with lone
surrogates is matched on its other characters instead of being rejected.

Entry ids are positions in ``entries``. A text matches entry ``e`` iff
``" " + e + " "`` occurs in the text after MetaCLIP's spacing (punctuation , . ; : ? ! `
wrapped in spaces, tab/newline/CR turned into spaces, one space of padding each side).
Every entry found anywhere, overlaps included, is reported once. Case-sensitive;
texts are matched on their UTF-8 bytes. Duplicate entries are allowed and each of
their ids is reported, as the naive reference would.
)doc")
        .def(py::init(&build), py::arg("entries"), py::arg("semantics") = "metaclip1",
             "Build from a list of metadata entries (str); semantics 'metaclip1' (default) or 'metaclip2'.")
        .def_property_readonly(
            "semantics", [](const Matcher& self) { return semantics_name(self.semantics()); },
            "'metaclip1' or 'metaclip2' (kept by save/load and pickling).")
        .def(
            "match",
            [](const Matcher& self, const py::handle& text) {
                py::object keep;
                std::string_view view = utf8_view(text.ptr(), "text", 0, takes_surrogates(self) ? &keep : nullptr);
                std::vector<int32_t> out;
                modefast::MatchScratch scratch;
                self.match(view, out, scratch);
                return out;
            },
            py::arg("text"), "Matched entry ids of one text, ascending.")
        .def(
            "match_batch",
            [](const Matcher& self, const py::handle& texts, int threads) {
                TextViews t = collect_texts(texts, "text", takes_surrogates(self));
                std::vector<int64_t> offsets;
                std::vector<int32_t> ids;
                {
                    py::gil_scoped_release release;
                    self.match_batch(t.views, threads, offsets, ids);
                }
                return py::make_tuple(to_numpy(std::move(offsets)), to_numpy(std::move(ids)));
            },
            py::arg("texts"), py::arg("threads") = 0,
            R"doc(Match many texts without the GIL; ``threads=0`` uses all cores.

Returns ``(offsets, ids)`` in CSR form: ``offsets`` int64 of length n+1 and ``ids`` int32;
the ids of text i are ``ids[offsets[i]:offsets[i+1]]``, ascending.)doc")
        .def("save", &save_file, py::arg("path"), "Write the built matcher (atomically) for Matcher.load.")
        .def_static("load", &load_file, py::arg("path"), "Load a matcher written by save, without rebuilding.")
        .def("__len__", &Matcher::size)
        .def(
            "entry", [](const Matcher& self, size_t i) { return decode(self.entry(i)); }, py::arg("id"))
        .def_property_readonly(
            "entries",
            [](const Matcher& self) {
                py::list out(self.size());
                for (size_t i = 0; i < self.size(); ++i) out[i] = decode(self.entry(i));
                return out;
            },
            "The metadata entries, in id order.")
        .def(py::pickle(
            [](const Matcher& self) {
                std::ostringstream out(std::ios::binary);
                self.save(out);
                return py::bytes(out.str());
            },
            [](const py::bytes& state) {
                std::istringstream in(std::string(state), std::ios::binary);
                return std::make_unique<Matcher>(Matcher::load(in));
            }))
        .def("__repr__", [](const Matcher& self) { return "<Matcher with " + std::to_string(self.size()) + " entries>"; });

    m.def(
        "is_cjk_or_similar", [](uint32_t cp) { return modefast::is_cjk_or_similar(cp); }, py::arg("code_point"),
        "MetaCLIP 2's rule for an entry edge that gets no padding space.");

    m.def(
        "hash_keys",
        [](const py::handle& keys, uint64_t seed) {
            TextViews t = collect_texts(keys, "key");
            std::vector<uint64_t> out(t.views.size());
            {
                py::gil_scoped_release release;
                for (size_t i = 0; i < t.views.size(); ++i)
                    out[i] = modefast::hash_bytes(t.views[i].data(), t.views[i].size(), seed);
            }
            return to_numpy(std::move(out));
        },
        py::arg("keys"), py::arg("seed") = 0,
        "Stable 64-bit hash of each key's UTF-8 bytes, mixed with seed (same on every platform).");
}
