// retention-test-requires: nlohmann_json
// retention-test-labels: sanitize
// safetensors reader on malformed input: every truncation, random bit flips, randomly generated
// headers checked against an independent validity oracle, and one case per header rule. Each
// must give retention::io::file_error naming the file (and the tensor), never a crash or an
// out-of-bounds read (the sanitize build runs this under ASan + UBSan; from_bytes copies the
// input into an exactly-sized buffer, so any read past the end is caught).
#include <retention/io/safetensors.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using retention::Index;
using retention::io::file_error;
using retention::io::SafetensorsReader;
using retention::io::TensorView;
using Bytes = std::vector<unsigned char>;

const char* const label = "fuzz.st";

Bytes with_length(std::uint64_t n, const std::string& header, const Bytes& data) {
  Bytes out(8 + header.size() + data.size());
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(n >> (8 * i));
  if (!header.empty()) std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

Bytes make_file(const std::string& header, const Bytes& data) {
  return with_length(header.size(), header, data);
}

Bytes data_of(std::size_t n) {
  Bytes d(n);
  for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<unsigned char>(i * 37 + 11);
  return d;
}

/// After a successful parse: every view lies inside the file, no two non-empty views share a
/// byte, and every byte and every convertible value can be read (ASan checks the reads).
void touch_everything(const SafetensorsReader& r) {
  const unsigned char* begin = r.file_data();
  const unsigned char* end = begin + r.file_size();
  std::vector<std::pair<const unsigned char*, const unsigned char*>> ranges;
  unsigned sum = 0;
  for (const std::string& name : r.names()) {
    const TensorView v = r.get(name);
    ASSERT_GE(v.data() + 0, begin) << name;
    ASSERT_LE(v.data() + v.nbytes(), end) << name;
    ASSERT_GE(r.header_length() + 8, 8u);
    ASSERT_GE(v.data(), begin + 8 + r.header_length()) << name << " reaches into the header";
    for (std::size_t i = 0; i < v.nbytes(); ++i) sum += v.data()[i];
    if (v.nbytes()) ranges.emplace_back(v.data(), v.data() + v.nbytes());
    if (retention::io::is_float_dtype(v.dtype()) && v.rank() <= 2) {
      const retention::Matrix<double> m = v.to_matrix<double>();
      EXPECT_EQ(m.size(), v.numel());
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i)
    EXPECT_LE(ranges[i - 1].second, ranges[i].first) << "overlapping views";
  (void)sum;
}

/// Parses `file`: true on success (after touching everything); false on file_error, whose
/// message must name the file. Any other exception fails the test.
bool parses(const Bytes& file) {
  try {
    const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size(), label);
    touch_everything(r);
    return true;
  } catch (const file_error& e) {
    EXPECT_NE(std::string(e.what()).find(label), std::string::npos) << e.what();
    return false;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a file_error: " << e.what();
    return false;
  }
}

void expect_error(const Bytes& file, const std::vector<std::string>& needles) {
  try {
    const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size(), label);
    ADD_FAILURE() << "expected file_error containing \"" << (needles.empty() ? "" : needles[0])
                  << "\"";
  } catch (const file_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(label), std::string::npos) << what;
    for (const std::string& n : needles)
      EXPECT_NE(what.find(n), std::string::npos) << "\"" << what << "\" lacks \"" << n << "\"";
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a file_error: " << e.what();
  }
}

/// A small valid file whose tensors cover the whole 24-byte data section.
const std::string base_header =
    R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
    R"("b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]},)"
    R"("c":{"dtype":"BF16","shape":[],"data_offsets":[22,24]}}   )";

Bytes base_file() { return make_file(base_header, data_of(24)); }

TEST(SafetensorsFuzz, BaseFileIsValid) {
  const Bytes file = base_file();
  ASSERT_TRUE(parses(file));
  const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size(), label);
  EXPECT_EQ(r.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(r.metadata().at("k"), "v");
}

TEST(SafetensorsFuzz, EveryTruncationFails) {
  const Bytes file = base_file();
  for (std::size_t n = 0; n < file.size(); ++n) {
    const Bytes cut(file.begin(), file.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_FALSE(parses(cut)) << "length " << n;
  }
}

TEST(SafetensorsFuzz, TruncatedFilesOnDisk) {
  // The mmap path (and the empty-file case where mmap cannot be used).
  const fs::path dir =
      fs::temp_directory_path() / ("retention_st_fuzz_" + std::to_string(std::random_device{}()));
  fs::create_directories(dir);
  const Bytes file = base_file();
  const std::size_t header_end = 8 + base_header.size();
  for (std::size_t n : {std::size_t(0), std::size_t(3), std::size_t(8), header_end - 1, header_end,
                        file.size() - 1}) {
    const std::string path = (dir / ("cut" + std::to_string(n))).string();
    {
      std::ofstream f(path, std::ios::binary);
      f.write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(n));
    }
    try {
      SafetensorsReader r(path);
      ADD_FAILURE() << "length " << n << " parsed";
    } catch (const file_error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);
}

TEST(SafetensorsFuzz, RandomBitFlipsInHeader) {
  const Bytes file = base_file();
  const std::size_t header_end = 8 + base_header.size();
  std::mt19937_64 rng(20240611);
  int ok = 0;
  const int cases = 3000;
  for (int c = 0; c < cases; ++c) {
    Bytes f = file;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) {
      const std::size_t pos = static_cast<std::size_t>(rng() % header_end);
      f[pos] = static_cast<unsigned char>(f[pos] ^ (1u << (rng() % 8)));
    }
    ok += parses(f) ? 1 : 0;
  }
  // Most flips break the header; some land in values that stay valid (a name, the metadata).
  EXPECT_LT(ok, cases);
  EXPECT_GT(ok, 0);
}

TEST(SafetensorsFuzz, RandomBytesAsHeader) {
  std::mt19937_64 rng(99);
  const std::string alphabet =
      "{}[]\":,0123456789-.eE \\u\x01\xff"
      "abcdtypeshaF";
  for (int c = 0; c < 500; ++c) {
    std::string h(1 + rng() % 60, ' ');
    for (char& ch : h) ch = alphabet[rng() % alphabet.size()];
    if (c % 2) h[0] = '{';
    EXPECT_FALSE(parses(make_file(h, data_of(rng() % 32)))) << h;
  }
}

// -----------------------------------------------------------------------------------------------
// Randomly generated headers against an independent oracle of the format's rules.

struct GenTensor {
  std::string dtype;
  std::vector<long long> shape;    // may be negative
  std::vector<std::string> extra;  // raw JSON tokens replacing shape entries (e.g. "2.5")
  unsigned long long begin = 0, end = 0;
};

std::size_t oracle_size(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E5M2" ||
      dtype == "F8_E4M3" || dtype == "F8_E8M0")
    return 1;
  return 0;  // unknown
}

/// The rules, written out again: known dtype, integer dims >= 0, bytes = numel * size without
/// overflow, begin <= end <= data size, end - begin = bytes, non-empty ranges disjoint.
bool oracle_valid(const std::vector<GenTensor>& ts, unsigned long long data_size) {
  const unsigned long long index_max = static_cast<unsigned long long>(INT64_MAX);
  std::vector<std::pair<unsigned long long, unsigned long long>> ranges;
  for (const GenTensor& t : ts) {
    const unsigned long long size = oracle_size(t.dtype);
    if (size == 0 || !t.extra.empty()) return false;
    // Element count as a running product that must stay in a signed 64-bit index (checked by
    // division), then the byte count.
    unsigned long long numel = 1;
    for (long long d : t.shape) {
      if (d < 0) return false;
      const auto ud = static_cast<unsigned long long>(d);
      if (ud != 0 && numel > index_max / ud) return false;
      numel *= ud;
    }
    if (numel > index_max / size) return false;
    const unsigned long long bytes = numel * size;
    if (t.begin > t.end || t.end > data_size) return false;
    if (t.end - t.begin != bytes) return false;
    if (t.end > t.begin) ranges.emplace_back(t.begin, t.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) return false;
  return true;
}

TEST(SafetensorsFuzz, GeneratedHeadersMatchOracle) {
  std::mt19937_64 rng(7);
  const std::vector<std::string> dtypes = {"F64",  "F32",     "F16", "BF16", "I32", "U8",
                                           "BOOL", "F8_E4M3", "F3",  "f32",  ""};
  auto pick = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };
  int valid = 0, invalid = 0;
  for (int c = 0; c < 1500; ++c) {
    const unsigned long long data_size = pick(48);
    std::vector<GenTensor> ts(pick(4));
    unsigned long long cursor = pick(3);
    for (GenTensor& t : ts) {
      t.dtype = pick(4) ? dtypes[pick(4)] : dtypes[pick(dtypes.size())];
      const std::size_t rank = pick(4);
      for (std::size_t k = 0; k < rank; ++k) {
        const std::size_t r = pick(40);
        t.shape.push_back(r == 0   ? -1
                          : r == 1 ? (1ll << 62)
                          : r == 2 ? (1ll << 31)
                                   : static_cast<long long>(pick(4)));
      }
      if (pick(30) == 0) t.extra.push_back(pick(2) ? "2.5" : "\"3\"");
      // Mostly consistent offsets laid after each other; sometimes off by a little or huge.
      unsigned long long bytes = oracle_size(t.dtype) ? oracle_size(t.dtype) : 1;
      bool huge = false;
      for (long long d : t.shape) {
        if (d < 0 || d > 64)
          huge = true;
        else
          bytes *= static_cast<unsigned long long>(d);
      }
      if (huge) bytes = pick(16);
      const std::size_t mode = pick(10);
      t.begin = mode == 0 ? cursor - std::min<unsigned long long>(cursor, pick(8)) : cursor;
      t.end = t.begin + bytes + (mode == 1 ? 1 : 0) - (mode == 2 && bytes ? 1 : 0);
      if (mode == 3) std::swap(t.begin, t.end);
      if (mode == 4) t.end = 18446744073709551615ull;
      cursor = std::max(cursor, t.end);
    }
    std::string h = "{";
    for (std::size_t i = 0; i < ts.size(); ++i) {
      const GenTensor& t = ts[i];
      if (i) h += ",";
      h += "\"t" + std::to_string(i) + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
      for (std::size_t k = 0; k < t.shape.size(); ++k)
        h += (k ? "," : "") + std::to_string(t.shape[k]);
      for (std::size_t k = 0; k < t.extra.size(); ++k)
        h += (k || !t.shape.empty() ? "," : "") + t.extra[k];
      h += "],\"data_offsets\":[" + std::to_string(t.begin) + "," + std::to_string(t.end) + "]}";
    }
    h += "}";
    const bool expected = oracle_valid(ts, data_size);
    EXPECT_EQ(parses(make_file(h, data_of(data_size))), expected) << h << " data " << data_size;
    (expected ? valid : invalid) += 1;
  }
  // The generator must exercise both outcomes substantially.
  EXPECT_GT(valid, 150);
  EXPECT_GT(invalid, 150);
}

// -----------------------------------------------------------------------------------------------
// One case per rule, each with the message it must give.

std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return "{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

TEST(SafetensorsFuzz, LengthField) {
  expect_error(Bytes(), {"0 bytes", "too short"});
  expect_error(Bytes(7, 0), {"7 bytes", "too short"});
  expect_error(with_length(0, "{}", {}), {"header length is 0"});
  expect_error(with_length(3, "{}", {}), {"header length 3 exceeds the 2 bytes"});
  expect_error(with_length(1000, "{}", data_of(8)), {"header length 1000 exceeds"});
  expect_error(with_length(~0ull, "{}", data_of(8)), {"header length 18446744073709551615"});
  expect_error(with_length(1ull << 63, "{}", {}), {"exceeds"});
}

TEST(SafetensorsFuzz, NotJsonOrNotAnObject) {
  expect_error(make_file("{not json}", {}), {"not valid JSON"});
  expect_error(make_file("{\"a\":1,}", {}), {"not valid JSON"});
  expect_error(make_file("{}x", {}), {"not valid JSON"});
  expect_error(make_file(std::string("{}\0\0", 4), {}), {"NUL byte at offset 2"});
  expect_error(make_file(std::string("{}\0junk", 7), {}), {"not valid JSON"});
  expect_error(make_file("{\"\xff\":1}", {}), {"not valid JSON"});         // invalid UTF-8
  expect_error(make_file("{\"a\":\"\\ud800\"}", {}), {"not valid JSON"});  // lone surrogate
  expect_error(make_file("[1,2]", {}), {"JSON but an array, not an object"});
  expect_error(make_file("42", {}), {"not an object"});
  expect_error(make_file("\"str\"", {}), {"not an object"});
  expect_error(make_file("null", {}), {"not an object"});
  expect_error(make_file(" {}", {}), {"does not start with '{'"});
  expect_error(make_file("{\"a\":[[[[[[[[[[[[1]]]]]]]]]]]]}", {}), {"nested deeper"});
  std::string deep = "{\"a\":";
  for (int i = 0; i < 100000; ++i) deep += '[';
  expect_error(make_file(deep, {}), {});
}

TEST(SafetensorsFuzz, DuplicateKeys) {
  const std::string a = entry("\"F32\"", "[1]", "[0,4]");
  expect_error(make_file("{\"a\":" + a + ",\"a\":" + a + "}", data_of(4)), {"repeats the key 'a'"});
  expect_error(make_file(R"({"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}})",
                         data_of(4)),
               {"repeats the key 'dtype'"});
  expect_error(make_file(R"({"__metadata__":{"k":"1","k":"2"}})", {}), {"repeats the key 'k'"});
  // The same key in two different objects is fine.
  EXPECT_TRUE(parses(
      make_file("{\"a\":" + a + ",\"b\":" + entry("\"F32\"", "[1]", "[4,8]") + "}", data_of(8))));
}

TEST(SafetensorsFuzz, EntryStructure) {
  expect_error(make_file(R"({"w":5})", {}), {"'w'", "expected an object"});
  expect_error(make_file(R"({"w":[]})", {}), {"'w'", "expected an object"});
  expect_error(make_file(R"({"w":{"dtype":"F32","shape":[1]}})", data_of(4)),
               {"'w'", "missing header field 'data_offsets'"});
  expect_error(make_file(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", data_of(4)),
               {"'w'", "missing header field 'dtype'"});
  expect_error(
      make_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}})", data_of(4)),
      {"'w'", "unknown header field 'extra'"});
}

TEST(SafetensorsFuzz, Dtype) {
  expect_error(make_file("{\"w\":" + entry("3", "[1]", "[0,4]") + "}", data_of(4)),
               {"'w'", "dtype is a number"});
  expect_error(make_file("{\"w\":" + entry("\"F3\"", "[1]", "[0,4]") + "}", data_of(4)),
               {"'w'", "unknown dtype 'F3'"});
  expect_error(make_file("{\"w\":" + entry("\"f32\"", "[1]", "[0,4]") + "}", data_of(4)),
               {"unknown dtype 'f32'"});
  // Known but not convertible: parses, views fine, conversion refused only when asked.
  const Bytes f = make_file("{\"w\":" + entry("\"I16\"", "[2]", "[0,4]") + "}", data_of(4));
  ASSERT_TRUE(parses(f));
  const SafetensorsReader r = SafetensorsReader::from_bytes(f.data(), f.size(), label);
  EXPECT_EQ(r.get("w").dtype(), retention::io::DType::i16);
  EXPECT_THROW((void)r.to_matrix<float>("w"), file_error);
}

TEST(SafetensorsFuzz, Shape) {
  auto shape_case = [](const std::string& shape, const std::string& offsets, std::size_t data) {
    return make_file("{\"w\":" + entry("\"F32\"", shape, offsets) + "}", data_of(data));
  };
  expect_error(shape_case("4", "[0,16]", 16), {"'w'", "shape is a number, expected an array"});
  expect_error(shape_case("{}", "[0,16]", 16), {"'w'", "shape is an object"});
  expect_error(shape_case("[-1,4]", "[0,16]", 16), {"'w'", "shape[0] is -1"});
  expect_error(shape_case("[4,-4]", "[0,16]", 16), {"shape[1] is -4"});
  expect_error(shape_case("[2.5]", "[0,16]", 16), {"shape[0] is 2.5"});
  expect_error(shape_case("[4.0]", "[0,16]", 16), {"shape[0] is 4.0"});
  expect_error(shape_case("[1e2]", "[0,16]", 16), {"shape[0] is 100.0"});
  expect_error(shape_case("[\"4\"]", "[0,16]", 16), {"shape[0] is \"4\""});
  expect_error(shape_case("[null]", "[0,16]", 16), {"shape[0] is null"});
  expect_error(shape_case("[[4]]", "[0,16]", 16), {"shape[0] is [4]"});
  expect_error(shape_case("[18446744073709551615]", "[0,16]", 16),
               {"shape[0] = 18446744073709551615 is too large"});
  expect_error(shape_case("[18446744073709551616]", "[0,16]", 16),
               {"expected a non-negative integer"});
  expect_error(shape_case("[4294967296,4294967296]", "[0,16]", 16), {"'w'", "too many elements"});
  // numel fits in 64 bits but numel * 4 bytes does not.
  expect_error(shape_case("[2305843009213693952]", "[0,16]", 16), {"too many elements"});
  expect_error(shape_case("[3037000500,3037000500]", "[0,16]", 16), {"too many elements"});
  // A zero dim makes a huge other dim harmless: 0 elements, 0 bytes.
  EXPECT_TRUE(parses(shape_case("[0,9223372036854775807]", "[0,0]", 0)));
}

TEST(SafetensorsFuzz, DataOffsets) {
  auto off = [](const std::string& offsets, std::size_t data) {
    return make_file("{\"w\":" + entry("\"F32\"", "[2,2]", offsets) + "}", data_of(data));
  };
  expect_error(off("[0]", 16), {"'w'", "data_offsets is [0]"});
  expect_error(off("[0,16,16]", 16), {"data_offsets is [0,16,16]"});
  expect_error(off("16", 16), {"data_offsets is 16"});
  expect_error(off("[-1,15]", 16), {"data_offsets is [-1,15]"});
  expect_error(off("[0,16.0]", 16), {"data_offsets is [0,16.0]"});
  expect_error(off("[0,\"16\"]", 16), {"data_offsets is"});
  expect_error(off("[0,18446744073709551616]", 16), {"data_offsets is"});
  expect_error(off("[16,0]", 16), {"'w'", "data_offsets [16, 0] has begin > end"});
  expect_error(off("[0,16]", 15), {"'w'", "data_offsets [0, 16] ends past the 15-byte data"});
  expect_error(off("[8,24]", 16), {"ends past"});
  expect_error(off("[18446744073709551599,18446744073709551615]", 16), {"ends past"});
  expect_error(off("[9223372036854775807,9223372036854775823]", 16), {"ends past"});
  expect_error(off("[0,12]", 16), {"'w'", "holds 12 bytes but F32 [2, 2] needs 16"});
  expect_error(off("[0,20]", 32), {"holds 20 bytes but F32 [2, 2] needs 16"});
  EXPECT_TRUE(parses(off("[4,20]", 32)));  // leading and trailing holes are allowed
}

TEST(SafetensorsFuzz, Overlaps) {
  auto two = [](const std::string& a, const std::string& b, std::size_t data) {
    return make_file(
        "{\"a\":" + entry("\"F32\"", "[4]", a) + ",\"b\":" + entry("\"F32\"", "[2]", b) + "}",
        data_of(data));
  };
  expect_error(two("[0,16]", "[8,16]", 16), {"'b'", "overlap tensor 'a'"});
  expect_error(two("[4,20]", "[0,8]", 24), {"'a'", "overlap tensor 'b'"});
  expect_error(two("[0,16]", "[4,12]", 16), {"overlap"});
  expect_error(two("[8,24]", "[4,12]", 24), {"overlap"});
  EXPECT_TRUE(parses(two("[0,16]", "[16,24]", 24)));  // adjacent
  EXPECT_TRUE(parses(two("[8,24]", "[0,8]", 24)));    // adjacent, listed out of order
  EXPECT_TRUE(parses(two("[0,16]", "[20,28]", 32)));  // a hole between them
  // Identical ranges of two tensors.
  expect_error(make_file("{\"a\":" + entry("\"F32\"", "[2]", "[0,8]") +
                             ",\"b\":" + entry("\"I32\"", "[2]", "[0,8]") + "}",
                         data_of(8)),
               {"overlap"});
  // An empty tensor owns no bytes, even when its offset lies inside another tensor.
  EXPECT_TRUE(parses(make_file("{\"a\":" + entry("\"F32\"", "[4]", "[0,16]") +
                                   ",\"e\":" + entry("\"F32\"", "[0,3]", "[4,4]") + "}",
                               data_of(16))));
}

TEST(SafetensorsFuzz, Metadata) {
  expect_error(make_file(R"({"__metadata__":5})", {}), {"__metadata__ is a number"});
  expect_error(make_file(R"({"__metadata__":["a"]})", {}), {"__metadata__ is an array"});
  expect_error(make_file(R"({"__metadata__":{"k":1}})", {}),
               {"__metadata__ value of 'k' is a number, expected a string"});
  expect_error(make_file(R"({"__metadata__":{"k":{"x":"y"}}})", {}), {"value of 'k'"});
  const Bytes ok = make_file(R"({"__metadata__":{"k":"v","":"\u00e9"}}        )", {});
  ASSERT_TRUE(parses(ok));
  const SafetensorsReader r = SafetensorsReader::from_bytes(ok.data(), ok.size(), label);
  EXPECT_EQ(r.metadata().at(""), "\xc3\xa9");
  EXPECT_EQ(r.size(), 0u);
}

TEST(SafetensorsFuzz, OddButValidNames) {
  const Bytes f = make_file("{\"\":" + entry("\"U8\"", "[1]", "[0,1]") +
                                ",\"a\\u0000b\":" + entry("\"U8\"", "[1]", "[1,2]") + "}",
                            data_of(2));
  ASSERT_TRUE(parses(f));
  const SafetensorsReader r = SafetensorsReader::from_bytes(f.data(), f.size(), label);
  EXPECT_TRUE(r.has(""));
  EXPECT_TRUE(r.has(std::string("a\0b", 3)));
  EXPECT_EQ(r.get(std::string("a\0b", 3)).data()[0], data_of(2)[1]);
}

}  // namespace
