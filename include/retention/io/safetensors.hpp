// retention/io: .safetensors reader (memory-mapped, every header field validated before anything is
// exposed) and writer. The only header of the library that needs nlohmann-json.
//
// Format: 8-byte little-endian header length N, N bytes of JSON header (an object: tensor name ->
// {"dtype", "shape", "data_offsets": [begin, end)} relative to the data section, plus an optional
// "__metadata__" string -> string map), then the data section (row-major, little-endian).
#pragma once

// clang-format off
#if !__has_include(<nlohmann/json.hpp>)
#error "retention/io/safetensors.hpp needs nlohmann-json 3 (<nlohmann/json.hpp>): install it (Debian/Ubuntu: nlohmann-json3-dev) and link nlohmann_json::nlohmann_json. retention/io/tensor.hpp alone does not need it."
#else  // the rest of the file: nothing more to report when the dependency is missing
// clang-format on

#include <retention/io/tensor.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace retention {
namespace io {

/// The "__metadata__" map of a safetensors header.
using Metadata = std::map<std::string, std::string>;

namespace detail {

/// Headers above this are refused (the reference implementation's limit too): a corrupt length
/// field must not make us parse gigabytes as JSON.
constexpr std::uint64_t max_header_bytes = 100000000;

inline std::string errno_text(int err) { return std::generic_category().message(err); }

/// The bytes of a file: a read-only private mapping, or a heap copy when mapping fails or the
/// bytes came from memory. Move-only.
class FileBytes {
 public:
  FileBytes() = default;
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  FileBytes(FileBytes&& o) noexcept { swap(o); }
  FileBytes& operator=(FileBytes&& o) noexcept {
    FileBytes tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~FileBytes() { release(); }

  /// An exactly-sized heap copy (so that sanitizers see any read past the end).
  static FileBytes copy_of(const void* bytes, std::size_t size) {
    FileBytes f;
    f.buffer_.reset(new unsigned char[size == 0 ? 1 : size]);
    if (size) std::memcpy(f.buffer_.get(), bytes, size);
    f.data_ = f.buffer_.get();
    f.size_ = size;
    return f;
  }

  /// Maps `path` read-only, or reads it when mmap fails. Throws file_error naming the path.
  static FileBytes open(const std::string& path) {
#if defined(__unix__) || defined(__APPLE__)
    int fd = -1;
    do {
      fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) io_fail(path, "", "cannot open: " + errno_text(errno));
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st;
    if (::fstat(fd, &st) != 0) io_fail(path, "", "cannot stat: " + errno_text(errno));
    if (!S_ISREG(st.st_mode)) io_fail(path, "", "not a regular file");
    if (st.st_size < 0 ||
        static_cast<std::uint64_t>(st.st_size) > std::numeric_limits<std::size_t>::max())
      io_fail(path, "", "file size " + std::to_string(st.st_size) + " cannot be addressed");
    const std::size_t size = static_cast<std::size_t>(st.st_size);
    FileBytes f;
    if (size > 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p != MAP_FAILED) {
        f.map_ = p;
        f.data_ = static_cast<const unsigned char*>(p);
        f.size_ = size;
        return f;
      }
    }
    // Some file systems cannot be mapped: read the whole file instead.
    f.buffer_.reset(new unsigned char[size == 0 ? 1 : size]);
    std::size_t done = 0;
    while (done < size) {
      const ::ssize_t n =
          ::pread(fd, f.buffer_.get() + done, size - done, static_cast< ::off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) io_fail(path, "", "read failed: " + errno_text(errno));
      if (n == 0) io_fail(path, "", "file shrank while it was read");
      done += static_cast<std::size_t>(n);
    }
    f.data_ = f.buffer_.get();
    f.size_ = size;
    return f;
#else
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) io_fail(path, "", "cannot open");
    const std::streamoff end = in.tellg();
    if (end < 0) io_fail(path, "", "cannot determine the file size");
    const std::size_t size = static_cast<std::size_t>(end);
    FileBytes f;
    f.buffer_.reset(new unsigned char[size == 0 ? 1 : size]);
    in.seekg(0);
    if (size &&
        !in.read(reinterpret_cast<char*>(f.buffer_.get()), static_cast<std::streamsize>(size)))
      io_fail(path, "", "read failed");
    f.data_ = f.buffer_.get();
    f.size_ = size;
    return f;
#endif
  }

  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool mapped() const { return map_ != nullptr; }

 private:
  void swap(FileBytes& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(map_, o.map_);
    std::swap(buffer_, o.buffer_);
  }
  void release() noexcept {
#if defined(__unix__) || defined(__APPLE__)
    if (map_) ::munmap(map_, size_);
#endif
    map_ = nullptr;
  }

  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
  void* map_ = nullptr;
  std::unique_ptr<unsigned char[]> buffer_;
};

/// A validated tensor entry: dtype, shape and [begin, end) within the data section.
struct SafetensorsEntry {
  DType dtype = DType::f32;
  std::vector<Index> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

using json = nlohmann::json;

/// "an object", "a number", ... for messages.
inline std::string json_kind(const json& j) {
  const std::string t = j.type_name();
  if (t == "null") return t;
  return (t[0] == 'a' || t[0] == 'o' ? "an " : "a ") + t;
}

/// A JSON integer >= 0 as uint64; false for negatives, fractions and non-numbers. (nlohmann keeps
/// integers as integers and every number with '.' or an exponent as a float.)
inline bool json_uint(const json& j, std::uint64_t& out) {
  if (j.is_number_unsigned()) {
    out = j.get<std::uint64_t>();
    return true;
  }
  if (j.is_number_integer()) {
    const std::int64_t v = j.get<std::int64_t>();
    if (v < 0) return false;
    out = static_cast<std::uint64_t>(v);
    return true;
  }
  return false;
}

/// Parses the header text, rejecting duplicate keys in any object (nlohmann would silently keep
/// the last) and nesting deeper than a safetensors header can have.
inline json parse_header_json(const char* first, const char* last, const std::string& origin) {
  std::vector<std::set<std::string> > open_objects;
  json::parser_callback_t check = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > 8) io_fail(origin, "", "header JSON is nested deeper than a safetensors header");
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && parsed.is_string() &&
            !open_objects.back().insert(parsed.get<std::string>()).second)
          io_fail(origin, "", "header JSON repeats the key '" + parsed.get<std::string>() + "'");
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(first, last, check);
  } catch (const json::exception& e) {
    io_fail(origin, "", std::string("header is not valid JSON: ") + e.what());
  }
}

/// Validates one tensor entry against a data section of `data_size` bytes.
inline SafetensorsEntry parse_entry(const std::string& origin, const std::string& name,
                                    const json& j, std::uint64_t data_size) {
  if (!j.is_object())
    io_fail(origin, name,
            "header entry is " + json_kind(j) +
                ", expected an object with dtype, shape and data_offsets");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      io_fail(origin, name, "unknown header field '" + it.key() + "'");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!j.contains(field))
      io_fail(origin, name, std::string("missing header field '") + field + "'");

  SafetensorsEntry e;
  const json& dtype = j["dtype"];
  if (!dtype.is_string())
    io_fail(origin, name, "dtype is " + json_kind(dtype) + ", expected a string");
  if (!parse_dtype(dtype.get<std::string>(), e.dtype))
    io_fail(origin, name,
            "unknown dtype '" + dtype.get<std::string>() +
                "' (known: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL F8_E5M2 F8_E4M3 "
                "F8_E8M0)");

  const json& shape = j["shape"];
  if (!shape.is_array())
    io_fail(origin, name, "shape is " + json_kind(shape) + ", expected an array");
  e.shape.reserve(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i) {
    std::uint64_t d = 0;
    if (!json_uint(shape[i], d))
      io_fail(origin, name,
              "shape[" + std::to_string(i) + "] is " + shape[i].dump() +
                  ", expected a non-negative integer");
    if (d > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
      io_fail(origin, name,
              "shape[" + std::to_string(i) + "] = " + std::to_string(d) + " is too large");
    e.shape.push_back(static_cast<Index>(d));
  }
  Index numel = 0;
  Index nbytes = 0;
  if (!shape_numel(e.shape, numel) ||
      retention::detail::mul_overflows(numel, static_cast<Index>(dtype_size(e.dtype)), nbytes))
    io_fail(origin, name, "shape " + shape_to_string(e.shape) + " has too many elements");

  const json& offsets = j["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !json_uint(offsets[0], e.begin) ||
      !json_uint(offsets[1], e.end))
    io_fail(origin, name,
            "data_offsets is " + offsets.dump() + ", expected [begin, end] with integers >= 0");
  const std::string range =
      "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
  if (e.begin > e.end) io_fail(origin, name, range + " has begin > end");
  if (e.end > data_size)
    io_fail(origin, name,
            range + " ends past the " + std::to_string(data_size) + "-byte data section");
  if (e.end - e.begin != static_cast<std::uint64_t>(nbytes))
    io_fail(origin, name,
            range + " holds " + std::to_string(e.end - e.begin) + " bytes but " +
                to_string(e.dtype) + " " + shape_to_string(e.shape) + " needs " +
                std::to_string(nbytes));
  return e;
}

}  // namespace detail

/// A .safetensors file, memory-mapped read-only (or read into memory when mapping fails). The
/// constructor validates the whole header (length, JSON, every dtype, shape and data_offsets, no
/// two tensors overlapping, __metadata__ strings) and throws file_error naming the file and the
/// tensor; afterwards every view it hands out lies inside the file. Views and with_prefix views
/// point into this object: keep it alive (and do not move it) while they are used. As with any
/// mapping, another process truncating the file in place would fault on access; write_safetensors
/// replaces files by rename, which is safe.
class SafetensorsReader final : public TensorSource {
 public:
  /// Opens and validates `path`.
  explicit SafetensorsReader(const std::string& path)
      : SafetensorsReader(detail::FileBytes::open(path), path) {}

  /// Validates a copy of `size` bytes of a whole file held in memory; `label` names it in errors.
  static SafetensorsReader from_bytes(const void* bytes, std::size_t size,
                                      const std::string& label = "<memory>") {
    return SafetensorsReader(detail::FileBytes::copy_of(bytes, size), label);
  }

  SafetensorsReader(SafetensorsReader&&) = default;
  SafetensorsReader& operator=(SafetensorsReader&&) = default;

  bool has(const std::string& name) const override { return entries_.count(name) != 0; }

  TensorView get(const std::string& name) const override {
    const auto it = entries_.find(name);
    if (it == entries_.end()) detail::missing_tensor(path_, name, names());
    const detail::SafetensorsEntry& e = it->second;
    return TensorView(e.dtype, e.shape, data_section() + e.begin,
                      static_cast<std::size_t>(e.end - e.begin), name, path_);
  }

  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& e : entries_) out.push_back(e.first);
    return out;
  }

  std::string description() const override { return path_; }

  /// The header's "__metadata__" map (empty when absent).
  const Metadata& metadata() const { return metadata_; }
  /// The path given to the constructor (or from_bytes' label).
  const std::string& path() const { return path_; }
  /// Number of tensors.
  std::size_t size() const { return entries_.size(); }
  /// Whole file size and header length N (the data section starts at 8 + N).
  std::size_t file_size() const { return bytes_.size(); }
  std::size_t header_length() const { return static_cast<std::size_t>(header_length_); }
  /// The whole file's bytes [file_size()]; every view lies inside them.
  const unsigned char* file_data() const { return bytes_.data(); }
  /// True when the bytes are a memory mapping of the file rather than a copy.
  bool memory_mapped() const { return bytes_.mapped(); }

 private:
  SafetensorsReader(detail::FileBytes bytes, std::string path)
      : bytes_(std::move(bytes)), path_(std::move(path)) {
    parse();
  }

  const unsigned char* data_section() const {
    return bytes_.data() + 8 + static_cast<std::size_t>(header_length_);
  }

  void parse() {
    const std::uint64_t size = bytes_.size();
    if (size < 8)
      detail::io_fail(
          path_, "",
          "file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
    const std::uint64_t n = detail::load_le<std::uint64_t>(bytes_.data());
    if (n == 0) detail::io_fail(path_, "", "header length is 0");
    if (n > size - 8)
      detail::io_fail(path_, "",
                      "header length " + std::to_string(n) + " exceeds the " +
                          std::to_string(size - 8) + " bytes after the length field");
    if (n > detail::max_header_bytes)
      detail::io_fail(path_, "",
                      "header length " + std::to_string(n) + " exceeds the limit of " +
                          std::to_string(detail::max_header_bytes) + " bytes");
    header_length_ = n;
    const char* text = reinterpret_cast<const char*>(bytes_.data() + 8);
    // nlohmann stops at a NUL as if the input ended, which would hide what follows it; JSON text
    // cannot contain a raw NUL anyway.
    if (const void* nul = std::memchr(text, '\0', static_cast<std::size_t>(n)))
      detail::io_fail(path_, "",
                      "header has a NUL byte at offset " +
                          std::to_string(static_cast<const char*>(nul) - text) +
                          " (not valid JSON)");
    const detail::json header = detail::parse_header_json(text, text + n, path_);
    if (!header.is_object())
      detail::io_fail(path_, "",
                      "header is JSON but " + detail::json_kind(header) + ", not an object");
    // The format requires the header to start with '{' (trailing space padding is allowed).
    if (text[0] != '{') detail::io_fail(path_, "", "header does not start with '{'");

    const std::uint64_t data_size = size - 8 - n;
    std::map<std::string, detail::SafetensorsEntry> entries;
    Metadata metadata;
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (!it->is_object())
          detail::io_fail(
              path_, "",
              "__metadata__ is " + detail::json_kind(*it) + ", expected an object of strings");
        for (auto m = it->begin(); m != it->end(); ++m) {
          if (!m->is_string())
            detail::io_fail(path_, "",
                            "__metadata__ value of '" + m.key() + "' is " + detail::json_kind(*m) +
                                ", expected a string");
          metadata[m.key()] = m->get<std::string>();
        }
        continue;
      }
      entries[it.key()] = detail::parse_entry(path_, it.key(), it.value(), data_size);
    }

    // No byte may belong to two tensors; empty tensors own no bytes. Holes are allowed.
    std::vector<std::pair<const std::string*, const detail::SafetensorsEntry*> > by_offset;
    for (const auto& e : entries)
      if (e.second.end > e.second.begin) by_offset.emplace_back(&e.first, &e.second);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const auto& prev = by_offset[i - 1];
      const auto& cur = by_offset[i];
      if (cur.second->begin < prev.second->end)
        detail::io_fail(path_, *cur.first,
                        "bytes [" + std::to_string(cur.second->begin) + ", " +
                            std::to_string(cur.second->end) + ") overlap tensor '" + *prev.first +
                            "' [" + std::to_string(prev.second->begin) + ", " +
                            std::to_string(prev.second->end) + ")");
    }
    entries_ = std::move(entries);
    metadata_ = std::move(metadata);
  }

  detail::FileBytes bytes_;
  std::string path_;
  std::uint64_t header_length_ = 0;
  std::map<std::string, detail::SafetensorsEntry> entries_;
  Metadata metadata_;
};

namespace detail {

/// The header bytes (length field + JSON padded with spaces to a multiple of 8) and the tensors
/// in data order: largest element size first, then by name, so that each tensor starts at a
/// multiple of its element size and maps without a copy.
struct SafetensorsLayout {
  std::vector<unsigned char> header;
  std::vector<std::pair<std::string, TensorView> > tensors;  // name as the source lists it
};

inline SafetensorsLayout plan_safetensors(const TensorSource& source, const Metadata& metadata) {
  const std::string origin = source.description();
  SafetensorsLayout layout;
  for (const std::string& name : source.names()) {
    if (name == "__metadata__") io_fail(origin, name, "name is reserved for metadata");
    layout.tensors.emplace_back(name, source.get(name));
  }
  std::stable_sort(layout.tensors.begin(), layout.tensors.end(), [](const auto& a, const auto& b) {
    return dtype_size(a.second.dtype()) > dtype_size(b.second.dtype());
  });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& t : layout.tensors) {
    const std::uint64_t end = offset + t.second.nbytes();
    header[t.first] = {{"dtype", to_string(t.second.dtype())},
                       {"shape", t.second.shape()},
                       {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    io_fail(origin, "",
            std::string("cannot write the header (names and metadata must be UTF-8): ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  layout.header.resize(8 + text.size());
  store_le(static_cast<std::uint64_t>(text.size()), layout.header.data());
  std::memcpy(layout.header.data() + 8, text.data(), text.size());
  return layout;
}

}  // namespace detail

/// The bytes of a .safetensors file holding every tensor of `tensors` (any TensorSource: a
/// TensorMap, a reader, a prefixed view) and `metadata` as "__metadata__" when non-empty.
inline std::vector<unsigned char> serialize_safetensors(const TensorSource& tensors,
                                                        const Metadata& metadata = Metadata()) {
  const detail::SafetensorsLayout layout = detail::plan_safetensors(tensors, metadata);
  std::vector<unsigned char> out = layout.header;
  for (const auto& t : layout.tensors)
    out.insert(out.end(), t.second.data(), t.second.data() + t.second.nbytes());
  return out;
}

/// Writes serialize_safetensors(tensors, metadata) to `path`. The bytes go to "<path>.partial"
/// first and are renamed into place, so a reader still mapping an old file at `path` keeps valid
/// bytes and a failed write leaves no half file. Throws file_error naming the path.
inline void write_safetensors(const std::string& path, const TensorSource& tensors,
                              const Metadata& metadata = Metadata()) {
  const detail::SafetensorsLayout layout = detail::plan_safetensors(tensors, metadata);
  const std::string partial = path + ".partial";
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    if (!out)
      detail::io_fail(path, "", "cannot create '" + partial + "': " + detail::errno_text(errno));
    out.write(reinterpret_cast<const char*>(layout.header.data()),
              static_cast<std::streamsize>(layout.header.size()));
    for (const auto& t : layout.tensors)
      out.write(reinterpret_cast<const char*>(t.second.data()),
                static_cast<std::streamsize>(t.second.nbytes()));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(partial, ignored);
      detail::io_fail(path, "", "writing '" + partial + "' failed");
    }
  }
  std::error_code err;
  std::filesystem::rename(partial, path, err);  // replaces an existing file
  if (err) {
    std::error_code ignored;
    std::filesystem::remove(partial, ignored);
    detail::io_fail(path, "", "cannot rename '" + partial + "' into place: " + err.message());
  }
}

}  // namespace io
}  // namespace retention

#endif  // __has_include(<nlohmann/json.hpp>)
