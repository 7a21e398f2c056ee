// retention-test-requires: nlohmann_json
// safetensors reader/writer: round trips of every dtype, typed access, 16-bit conversions against
// hand-computed bit patterns, prefixes, errors, and files written by scripts/safetensors_write.py.
#include <retention/io/safetensors.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <sys/wait.h>

namespace {

namespace fs = std::filesystem;
using retention::Index;
using retention::Matrix;
using retention::io::DType;
using retention::io::file_error;
using retention::io::Metadata;
using retention::io::SafetensorsReader;
using retention::io::TensorMap;
using retention::io::TensorView;
using Bytes = std::vector<unsigned char>;

/// Runs `f` and checks it throws file_error whose message contains every one of `needles`.
template <class F>
void expect_file_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected retention::io::file_error";
  } catch (const file_error& e) {
    const std::string what = e.what();
    for (const std::string& n : needles)
      EXPECT_NE(what.find(n), std::string::npos) << "\"" << what << "\" lacks \"" << n << "\"";
  }
}

/// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("retention_st_" + std::string(info->name()) + "_" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

Bytes random_bytes(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<unsigned char>(rng() & 0xFF);
  return b;
}

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-3.0, 3.0);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(rng));
  return m;
}

/// A file assembled by hand: length field, header text, data bytes (no writer involved).
Bytes make_file(const std::string& header, const Bytes& data) {
  // resize + memcpy rather than insert: GCC 12 misreports vector::insert under -Warray-bounds.
  Bytes out(8 + header.size() + data.size());
  const std::uint64_t n = header.size();
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(n >> (8 * i));
  if (!header.empty()) std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

void write_bytes(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

bool same_bytes(const TensorView& v, const Bytes& expected) {
  return v.nbytes() == expected.size() &&
         (expected.empty() || std::memcmp(v.data(), expected.data(), expected.size()) == 0);
}

// ---------------------------------------------------------------------------------------------
// dtypes

TEST(SafetensorsDType, NamesAndSizes) {
  const std::vector<std::pair<std::string, std::size_t>> table = {
      {"F64", 8},  {"F32", 4},     {"F16", 2},     {"BF16", 2},   {"I64", 8}, {"I32", 4},
      {"I16", 2},  {"I8", 1},      {"U64", 8},     {"U32", 4},    {"U16", 2}, {"U8", 1},
      {"BOOL", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1}};
  for (const auto& [name, size] : table) {
    DType d{};
    ASSERT_TRUE(retention::io::parse_dtype(name, d)) << name;
    EXPECT_EQ(std::string(retention::io::to_string(d)), name);
    EXPECT_EQ(retention::io::dtype_size(d), size) << name;
  }
  DType d{};
  for (const char* bad : {"", "f32", "F 32", "F4", "C64", "FLOAT"})
    EXPECT_FALSE(retention::io::parse_dtype(bad, d)) << bad;
}

// ---------------------------------------------------------------------------------------------
// Round trips

struct RawTensor {
  std::string name;
  DType dtype;
  std::vector<Index> shape;
  Bytes bytes;
};

std::vector<RawTensor> every_dtype_tensors(std::uint64_t seed) {
  std::vector<RawTensor> out;
  const DType all[] = {DType::f64,     DType::f32,     DType::f16,     DType::bf16,
                       DType::i64,     DType::i32,     DType::i16,     DType::i8,
                       DType::u64,     DType::u32,     DType::u16,     DType::u8,
                       DType::boolean, DType::f8_e5m2, DType::f8_e4m3, DType::f8_e8m0};
  std::uint64_t s = seed;
  for (DType d : all) {
    const std::string n = retention::io::to_string(d);
    const std::size_t size = retention::io::dtype_size(d);
    out.push_back({"m." + n, d, {3, 5}, random_bytes(15 * size, ++s)});
    out.push_back({"v." + n, d, {7}, random_bytes(7 * size, ++s)});
    out.push_back({"s." + n, d, {}, random_bytes(size, ++s)});
    out.push_back({"e." + n, d, {0, 4}, {}});
    out.push_back({"r3." + n, d, {2, 1, 3}, random_bytes(6 * size, ++s)});
  }
  return out;
}

void check_round_trip(const SafetensorsReader& r, const std::vector<RawTensor>& tensors,
                      const Metadata& metadata) {
  EXPECT_EQ(r.size(), tensors.size());
  EXPECT_EQ(r.metadata(), metadata);
  const unsigned char* data_start = nullptr;
  for (const RawTensor& t : tensors) {
    ASSERT_TRUE(r.has(t.name)) << t.name;
    const TensorView v = r.get(t.name);
    EXPECT_EQ(v.dtype(), t.dtype) << t.name;
    EXPECT_EQ(v.shape(), t.shape) << t.name;
    EXPECT_TRUE(same_bytes(v, t.bytes)) << t.name;
    EXPECT_EQ(v.name(), t.name);
    EXPECT_EQ(v.origin(), r.path());
    if (v.nbytes()) data_start = data_start ? std::min(data_start, v.data()) : v.data();
  }
  // The writer orders data by element size, so every tensor starts at a multiple of its size
  // from the data section, which itself starts at a multiple of 8 in the file.
  EXPECT_EQ(r.header_length() % 8, 0u);
  const unsigned char* section = data_start;
  for (const RawTensor& t : tensors) {
    const TensorView v = r.get(t.name);
    if (v.nbytes()) {
      EXPECT_EQ(static_cast<std::size_t>(v.data() - section) % retention::io::dtype_size(t.dtype),
                0u)
          << t.name;
    }
  }
}

TEST(SafetensorsRoundTrip, EveryDtypeInMemoryAndOnDisk) {
  const std::vector<RawTensor> tensors = every_dtype_tensors(11);
  TensorMap map("round-trip");
  for (const RawTensor& t : tensors)
    map.add_bytes(t.name, t.dtype, t.shape, t.bytes.data(), t.bytes.size());
  const Metadata metadata = {{"format", "pt"}, {"note", "é ünïcode \"quoted\"\n"}, {"", ""}};

  const Bytes file = retention::io::serialize_safetensors(map, metadata);
  const SafetensorsReader mem = SafetensorsReader::from_bytes(file.data(), file.size(), "mem.st");
  EXPECT_EQ(mem.path(), "mem.st");
  EXPECT_FALSE(mem.memory_mapped());
  EXPECT_EQ(mem.file_size(), file.size());
  check_round_trip(mem, tensors, metadata);

  TempDir dir;
  const std::string path = dir.file("every.safetensors");
  retention::io::write_safetensors(path, map, metadata);
  EXPECT_FALSE(fs::exists(path + ".partial"));
  const SafetensorsReader disk(path);
  EXPECT_TRUE(disk.memory_mapped());
  check_round_trip(disk, tensors, metadata);

  // Same bytes from both paths; re-serialising a reader reproduces the file exactly.
  std::ifstream f(path, std::ios::binary);
  const Bytes on_disk((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(on_disk, file);
  EXPECT_EQ(retention::io::serialize_safetensors(disk, disk.metadata()), file);
}

TEST(SafetensorsRoundTrip, EmptyFileOfTensorsAndNoMetadata) {
  const TensorMap map;
  const Bytes file = retention::io::serialize_safetensors(map);
  // 8 + "{}" padded to 8 bytes.
  ASSERT_EQ(file.size(), 16u);
  EXPECT_EQ(std::string(file.begin() + 8, file.end()), "{}      ");
  const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size());
  EXPECT_EQ(r.size(), 0u);
  EXPECT_TRUE(r.metadata().empty());
  EXPECT_TRUE(r.names().empty());
}

TEST(SafetensorsRoundTrip, EigenTypesKeepShapesAndValues) {
  const Matrix<double> a = random_matrix<double>(4, 6, 1);
  const Eigen::VectorXf b = random_matrix<float>(9, 1, 2);
  const Eigen::RowVectorXd c = random_matrix<double>(1, 5, 3);
  const Eigen::MatrixXf colmajor = random_matrix<float>(3, 2, 4);  // stored row-major on write
  const Matrix<Eigen::half> h = random_matrix<float>(2, 3, 5).cast<Eigen::half>();
  const Matrix<Eigen::bfloat16> bf = random_matrix<float>(3, 1, 6).cast<Eigen::bfloat16>();
  TensorMap map;
  map.add("a", a).add("b", b).add("c", c).add("colmajor", colmajor).add("h", h).add("bf", bf);
  const Bytes file = retention::io::serialize_safetensors(map);
  const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size());

  EXPECT_EQ(r.get("a").shape(), (std::vector<Index>{4, 6}));
  EXPECT_EQ(r.get("b").shape(), (std::vector<Index>{9}));
  EXPECT_EQ(r.get("c").shape(), (std::vector<Index>{5}));
  EXPECT_EQ(r.get("colmajor").shape(), (std::vector<Index>{3, 2}));
  EXPECT_EQ(r.get("h").dtype(), DType::f16);
  EXPECT_EQ(r.get("bf").dtype(), DType::bf16);

  EXPECT_EQ(r.to_matrix<double>("a"), a);
  EXPECT_EQ(r.as_matrix<double>("a"), a);
  const Matrix<float> b_row = r.to_matrix<float>("b");  // 1-D reads as a row
  ASSERT_EQ(b_row.rows(), 1);
  EXPECT_EQ(b_row.transpose(), Matrix<float>(b));
  EXPECT_EQ(r.get("b").to_vector<float>(), b);
  EXPECT_EQ(r.to_matrix<double>("c"), Matrix<double>(c));
  EXPECT_EQ(r.to_matrix<float>("colmajor"), Matrix<float>(colmajor));
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 2; ++j)  // element (i, j) at row-major position i * 2 + j in the file
      EXPECT_EQ(std::memcmp(r.get("colmajor").data() + 4 * (i * 2 + j), &colmajor(i, j), 4), 0);
  const Eigen::Map<const Matrix<Eigen::half>> h_map = r.as_matrix<Eigen::half>("h");
  for (Index i = 0; i < h.size(); ++i)
    EXPECT_EQ(retention::io::detail::bits_of(h_map.data()[i]),
              retention::io::detail::bits_of(h.data()[i]));
  const Matrix<Eigen::half> h_back = r.to_matrix<Eigen::half>("h");
  const Matrix<Eigen::bfloat16> bf_back = r.to_matrix<Eigen::bfloat16>("bf");
  for (Index i = 0; i < h.size(); ++i)
    EXPECT_EQ(retention::io::detail::bits_of(h_back.data()[i]),
              retention::io::detail::bits_of(h.data()[i]));
  for (Index i = 0; i < bf.size(); ++i)
    EXPECT_EQ(retention::io::detail::bits_of(bf_back.data()[i]),
              retention::io::detail::bits_of(bf.data()[i]));
}

// ---------------------------------------------------------------------------------------------
// Typed access

template <class T>
class SafetensorsTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SafetensorsTyped, Scalars);

TYPED_TEST(SafetensorsTyped, AsMatrixIsZeroCopyAndToMatrixConverts) {
  using T = TypeParam;
  using Other = typename std::conditional<std::is_same<T, float>::value, double, float>::type;
  const Matrix<T> m = random_matrix<T>(5, 3, 21);
  TensorMap map;
  map.add("w", m);
  const Bytes file = retention::io::serialize_safetensors(map);
  const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size());
  const TensorView v = r.get("w");

  ASSERT_TRUE(v.can_map<T>());
  EXPECT_FALSE(v.can_map<Other>());
  const Eigen::Map<const Matrix<T>> mapped = r.as_matrix<T>("w");
  EXPECT_EQ(static_cast<const void*>(mapped.data()), static_cast<const void*>(v.data()));
  EXPECT_EQ(mapped, m);
  const Eigen::Map<const Matrix<T>> reshaped = v.as_matrix<T>(3, 5);
  for (Index i = 0; i < 15; ++i) EXPECT_EQ(reshaped.data()[i], m.data()[i]);

  const Matrix<Other> converted = r.to_matrix<Other>("w");
  ASSERT_EQ(converted.rows(), 5);
  ASSERT_EQ(converted.cols(), 3);
  for (Index i = 0; i < 5; ++i)
    for (Index j = 0; j < 3; ++j) EXPECT_EQ(converted(i, j), static_cast<Other>(m(i, j)));

  expect_file_error([&] { (void)v.as_matrix<Other>(); }, {"'w'", "to_matrix"});
  expect_file_error([&] { (void)r.to_matrix<T>("w", {3, 5}); }, {"'w'", "[5, 3]", "[3, 5]"});
  EXPECT_EQ(r.to_matrix<T>("w", {5, 3}), m);
  expect_file_error([&] { (void)v.to_matrix<T>(4, 4); }, {"cannot view", "[4 x 4]"});
}

TYPED_TEST(SafetensorsTyped, MisalignedDataIsCopiedNotMapped) {
  using T = TypeParam;
  // Header of 8k bytes keeps the data section aligned; the tensor then starts 1 byte into it.
  const std::string dt = sizeof(T) == 4 ? "F32" : "F64";
  const std::size_t n = 6;
  const Matrix<T> m = random_matrix<T>(2, 3, 33);
  Bytes data(1 + n * sizeof(T), 0xAB);
  std::memcpy(data.data() + 1, m.data(), n * sizeof(T));
  std::string header = "{\"x\":{\"dtype\":\"" + dt + "\",\"shape\":[2,3],\"data_offsets\":[1," +
                       std::to_string(1 + n * sizeof(T)) + "]}}";
  header.append((8 - header.size() % 8) % 8, ' ');
  const Bytes file = make_file(header, data);
  const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size(), "odd.st");
  const TensorView v = r.get("x");
  EXPECT_FALSE(v.can_map<T>());
  expect_file_error([&] { (void)v.as_matrix<T>(); }, {"odd.st", "'x'", "aligned"});
  EXPECT_EQ(v.to_matrix<T>(), m);
}

// ---------------------------------------------------------------------------------------------
// 16-bit conversions against hand-computed bit patterns

struct BitCase {
  std::uint16_t bits;
  double value;  // NaN means "any NaN"
};

const double nan_v = std::numeric_limits<double>::quiet_NaN();
const double inf_v = std::numeric_limits<double>::infinity();

template <class T>
void check_decode(DType dtype, const std::vector<BitCase>& cases) {
  Bytes bytes;
  for (const BitCase& c : cases) {
    bytes.push_back(static_cast<unsigned char>(c.bits & 0xFF));
    bytes.push_back(static_cast<unsigned char>(c.bits >> 8));
  }
  const TensorView v(dtype, {static_cast<Index>(cases.size())}, bytes.data(), bytes.size(), "bits");
  const Matrix<T> got = v.to_matrix<T>();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const T g = got(0, static_cast<Index>(i));
    if (std::isnan(cases[i].value)) {
      EXPECT_TRUE(std::isnan(g)) << std::hex << cases[i].bits;
    } else {
      EXPECT_EQ(g, static_cast<T>(cases[i].value)) << std::hex << cases[i].bits;
      EXPECT_EQ(std::signbit(g), std::signbit(cases[i].value)) << std::hex << cases[i].bits;
    }
  }
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
const std::vector<BitCase> f16_cases = {
    {0x3C00, 1.0},
    {0xC100, -2.5},
    {0x0000, 0.0},
    {0x8000, -0.0},
    {0x0001, std::ldexp(1.0, -24)},                     // smallest subnormal
    {0x03FF, 1023.0 * std::ldexp(1.0, -24)},            // largest subnormal
    {0x0400, std::ldexp(1.0, -14)},                     // smallest normal
    {0x7BFF, 65504.0},                                  // largest finite
    {0x3555, 0x155 * std::ldexp(1.0, -10 - 2) + 0.25},  // 0.333251953125
    {0x7C00, inf_v},
    {0xFC00, -inf_v},
    {0x7E00, nan_v},
    {0x7C01, nan_v},
    {0xFFFF, nan_v},
};

// bfloat16: the top 16 bits of a float32 (8 exponent bits, bias 127, 7 mantissa bits).
const std::vector<BitCase> bf16_cases = {
    {0x3F80, 1.0},
    {0xC020, -2.5},
    {0x0000, 0.0},
    {0x8000, -0.0},
    {0x0001, std::ldexp(1.0, -133)},                               // smallest subnormal
    {0x007F, 127.0 * std::ldexp(1.0, -133)},                       // largest subnormal
    {0x0080, std::ldexp(1.0, -126)},                               // smallest normal
    {0x7F7F, (2.0 - std::ldexp(1.0, -7)) * std::ldexp(1.0, 127)},  // largest finite
    {0x3EAB, 0.333984375},
    {0x7F80, inf_v},
    {0xFF80, -inf_v},
    {0x7FC0, nan_v},
    {0x7F81, nan_v},
    {0xFFC0, nan_v},
};

TEST(SafetensorsHalf, F16BitPatternsDecode) {
  check_decode<double>(DType::f16, f16_cases);
  check_decode<float>(DType::f16, f16_cases);
}

TEST(SafetensorsHalf, BF16BitPatternsDecode) {
  check_decode<double>(DType::bf16, bf16_cases);
  check_decode<float>(DType::bf16, bf16_cases);
}

struct EncodeCase {
  float value;
  std::uint16_t bits;
};

template <class H>
void check_encode(const std::vector<EncodeCase>& cases, bool nan_allowed_anywhere) {
  Matrix<float> m(1, static_cast<Index>(cases.size()));
  for (std::size_t i = 0; i < cases.size(); ++i) m(0, static_cast<Index>(i)) = cases[i].value;
  TensorMap map;
  map.add("x", m);
  const Matrix<H> h = map.get("x").to_matrix<H>();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const std::uint16_t got = retention::io::detail::bits_of(h(0, static_cast<Index>(i)));
    if (nan_allowed_anywhere && std::isnan(cases[i].value)) {
      const std::uint16_t exp_mask = std::is_same<H, Eigen::half>::value ? 0x7C00 : 0x7F80;
      EXPECT_EQ(got & exp_mask, exp_mask);
      EXPECT_NE(got & ~(exp_mask | 0x8000) & 0xFFFF, 0);
    } else {
      EXPECT_EQ(got, cases[i].bits) << cases[i].value;
    }
  }
}

TEST(SafetensorsHalf, F32ToF16RoundsToNearestEven) {
  check_encode<Eigen::half>(
      {
          {1.0f, 0x3C00},
          {-2.5f, 0xC100},
          {-0.0f, 0x8000},
          {1.0f + std::ldexp(1.0f, -11), 0x3C00},      // tie: stays on even mantissa 0
          {1.0f + 3 * std::ldexp(1.0f, -11), 0x3C02},  // tie: goes up to even mantissa 2
          {1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), 0x3C01},  // above the tie
          {std::ldexp(1.0f, -24), 0x0001},
          {std::ldexp(1.0f, -25), 0x0000},      // tie between 0 and 2^-24: even is 0
          {3 * std::ldexp(1.0f, -26), 0x0001},  // 0.75 of the smallest subnormal
          {65504.0f, 0x7BFF},
          {65519.0f, 0x7BFF},  // below the midpoint to 65536
          {65520.0f, 0x7C00},  // the midpoint rounds to infinity
          {std::numeric_limits<float>::infinity(), 0x7C00},
          {-std::numeric_limits<float>::infinity(), 0xFC00},
          {std::numeric_limits<float>::quiet_NaN(), 0x7E00},
      },
      true);
}

TEST(SafetensorsHalf, F32ToBF16RoundsToNearestEven) {
  check_encode<Eigen::bfloat16>(
      {
          {1.0f, 0x3F80},
          {-2.5f, 0xC020},
          {-0.0f, 0x8000},
          {1.0f + std::ldexp(1.0f, -8), 0x3F80},      // tie: stays even
          {1.0f + 3 * std::ldexp(1.0f, -8), 0x3F82},  // tie: up to even
          {1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20), 0x3F81},
          {std::ldexp(1.0f, -133), 0x0001},
          {std::numeric_limits<float>::max(), 0x7F80},  // rounds past the largest bf16
          {std::numeric_limits<float>::infinity(), 0x7F80},
          {std::numeric_limits<float>::quiet_NaN(), 0x7FC0},
      },
      true);
}

// ---------------------------------------------------------------------------------------------
// Prefixes and lookup

TEST(SafetensorsPrefix, LayerByLayerLookup) {
  TensorMap map("model.st");
  for (int layer = 0; layer < 3; ++layer)
    for (const char* p : {"q_proj", "k_proj"}) {
      const std::string name = "layers." + std::to_string(layer) + ".retention." + p + ".weight";
      map.add(name, random_matrix<float>(2, 2, static_cast<std::uint64_t>(layer * 10 + p[0])));
    }
  map.add("embed.weight", random_matrix<float>(3, 2, 99));
  const Bytes file = retention::io::serialize_safetensors(map);
  const SafetensorsReader r = SafetensorsReader::from_bytes(file.data(), file.size(), "model.st");

  const auto layer1 = r.with_prefix("layers.1.retention.");
  EXPECT_TRUE(layer1.has("q_proj.weight"));
  EXPECT_FALSE(layer1.has("embed.weight"));
  EXPECT_EQ(layer1.names(), (std::vector<std::string>{"k_proj.weight", "q_proj.weight"}));
  EXPECT_EQ(layer1.to_matrix<float>("q_proj.weight"),
            map.to_matrix<float>("layers.1.retention.q_proj.weight"));
  // Chained prefixes compose against the reader itself (the temporary is gone afterwards).
  const auto chained = r.with_prefix("layers.").with_prefix("2.").with_prefix("retention.");
  EXPECT_EQ(chained.prefix(), "layers.2.retention.");
  EXPECT_EQ(chained.to_matrix<float>("k_proj.weight"),
            map.to_matrix<float>("layers.2.retention.k_proj.weight"));

  // A missing name reports the full name, the file and candidates with the same ending.
  expect_file_error([&] { (void)r.with_prefix("layers.7.").get("q_proj.weight"); },
                    {"model.st", "'layers.7.q_proj.weight'", "not found", "7 tensors",
                     "layers.0.retention.q_proj.weight"});
  expect_file_error([&] { (void)map.get("nope"); }, {"model.st", "'nope'", "not found"});

  // Writing a prefixed view stores the names as the view sees them.
  const Bytes sub = retention::io::serialize_safetensors(layer1);
  const SafetensorsReader rs = SafetensorsReader::from_bytes(sub.data(), sub.size());
  EXPECT_EQ(rs.names(), (std::vector<std::string>{"k_proj.weight", "q_proj.weight"}));
  EXPECT_EQ(rs.to_matrix<float>("k_proj.weight"), layer1.to_matrix<float>("k_proj.weight"));
}

// ---------------------------------------------------------------------------------------------
// Errors that are not about malformed files (those are in test_safetensors_fuzz.cpp)

TEST(SafetensorsErrors, UnsupportedDtypeOnlyWhenConverted) {
  const Bytes ints = random_bytes(4 * 6, 5);
  TensorMap map("ints.st");
  map.add_bytes("ids", DType::i32, {2, 3}, ints.data(), ints.size());
  const TensorView v = map.get("ids");  // a view is fine
  EXPECT_TRUE(same_bytes(v, ints));
  expect_file_error([&] { (void)v.to_matrix<float>(); },
                    {"ints.st", "'ids'", "I32", "not supported"});
  expect_file_error([&] { (void)v.as_matrix<float>(); }, {"'ids'", "I32"});
}

TEST(SafetensorsErrors, RankAboveTwoNeedsExplicitReshape) {
  const Matrix<float> m = random_matrix<float>(1, 24, 8);
  TensorMap map;
  map.add<float>("conv", {2, 3, 4}, m.data());
  const TensorView v = map.get("conv");
  expect_file_error([&] { (void)v.to_matrix<float>(); }, {"'conv'", "rank 3", "[2, 3, 4]"});
  expect_file_error([&] { (void)v.as_matrix<float>(); }, {"rank 3"});
  const Matrix<float> r = v.to_matrix<float>(6, 4);
  for (Index i = 0; i < 24; ++i) EXPECT_EQ(r.data()[i], m.data()[i]);
  EXPECT_EQ(v.as_matrix<float>(2, 12).data()[23], m(0, 23));
}

TEST(SafetensorsErrors, TensorMapRejectsBadNamesAndSizes) {
  TensorMap map("m");
  const Matrix<float> x = random_matrix<float>(2, 2, 1);
  map.add("x", x);
  expect_file_error([&] { map.add("x", x); }, {"'x'", "twice"});
  expect_file_error([&] { map.add("__metadata__", x); }, {"reserved"});
  const Bytes b(10);
  expect_file_error([&] { map.add_bytes("y", DType::f32, {3}, b.data(), b.size()); },
                    {"'y'", "needs 12 bytes, got 10"});
  expect_file_error([&] { map.add_bytes("z", DType::f32, {-1}, b.data(), 0); }, {"negative"});
  expect_file_error([&] { map.add<float>("w", {-2, 3}, x.data()); }, {"'w'", "negative"});
  // Views made by hand get the same checks.
  expect_file_error(
      [&] {
        TensorView(DType::f16, {2, 2}, b.data(), b.size(), "h", "hand");
      },
      {"hand", "'h'", "needs 8 bytes, got 10"});
  EXPECT_EQ(map.size(), 1u);
}

TEST(SafetensorsErrors, WriterRejectsInvalidUtf8AndBadPaths) {
  TensorMap map;
  map.add("bad\xff", random_matrix<float>(1, 1, 2));
  expect_file_error([&] { (void)retention::io::serialize_safetensors(map); }, {"UTF-8"});
  TensorMap ok;
  ok.add("a", random_matrix<float>(1, 1, 3));
  expect_file_error(
      [&] {
        (void)retention::io::serialize_safetensors(ok, {{"k", "\xc3"}});
      },
      {"UTF-8"});
  TempDir dir;
  const std::string path = dir.file("no/such/dir/out.safetensors");
  expect_file_error([&] { retention::io::write_safetensors(path, ok); }, {path, "cannot create"});
}

TEST(SafetensorsErrors, ReaderReportsMissingAndSpecialFiles) {
  TempDir dir;
  const std::string missing = dir.file("missing.safetensors");
  expect_file_error([&] { SafetensorsReader r(missing); }, {missing, "cannot open"});
  expect_file_error([&] { SafetensorsReader r(dir.path.string()); },
                    {dir.path.string(), "not a regular file"});
  const std::string empty = dir.file("empty.safetensors");
  write_bytes(empty, {});
  expect_file_error([&] { SafetensorsReader r(empty); }, {empty, "0 bytes"});
  const std::string truncated = dir.file("trunc.safetensors");
  write_bytes(
      truncated,
      make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", Bytes(7)));
  expect_file_error([&] { SafetensorsReader r(truncated); },
                    {truncated, "'a'", "ends past the 7-byte data section"});
}

TEST(SafetensorsErrors, OverwritingAMappedFileLeavesOldViewsValid) {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  const Matrix<double> first = random_matrix<double>(8, 8, 1);
  TensorMap a;
  a.add("w", first);
  retention::io::write_safetensors(path, a);
  const SafetensorsReader r(path);
  const Eigen::Map<const Matrix<double>> view = r.as_matrix<double>("w");
  TensorMap b;
  b.add("w", random_matrix<double>(2, 2, 2));
  retention::io::write_safetensors(path, b);  // renamed into place: the old mapping survives
  EXPECT_EQ(view, first);
  EXPECT_EQ(SafetensorsReader(path).get("w").shape(), (std::vector<Index>{2, 2}));
}

// ---------------------------------------------------------------------------------------------
// Files written by scripts/safetensors_write.py

std::string python() {
  const char* p = std::getenv("RETENTION_PYTHON");
  return p && *p ? p : "/usr/bin/python3";
}

/// The exit code of a shell command, or -1 when it did not exit normally.
int run_status(const std::string& cmd) {
  const int status = std::system(cmd.c_str());
  return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool run_ok(const std::string& cmd) { return run_status(cmd) == 0; }

bool python_has(const std::string& module) {
  return fs::exists(python()) &&
         run_ok("'" + python() + "' -c 'import " + module + "' >/dev/null 2>&1");
}

fs::path scripts_dir() {
  const char* src = std::getenv("RETENTION_SOURCE_DIR");
  const fs::path root =
      src && *src ? fs::path(src) : fs::path(__FILE__).parent_path().parent_path();
  return root / "scripts";
}

/// Tensors whose bytes the test makes itself from a seed; Python reads them raw and re-saves them.
std::vector<RawTensor> python_tensors() {
  return {
      {"model.layers.0.w", DType::f64, {3, 4}, random_bytes(8 * 12, 101)},
      {"model.layers.0.b", DType::f32, {5}, random_bytes(4 * 5, 102)},
      {"model.half", DType::f16, {2, 3}, random_bytes(2 * 6, 103)},
      {"model.brain", DType::bf16, {3, 2}, random_bytes(2 * 6, 104)},
      {"ids", DType::i32, {4}, random_bytes(4 * 4, 105)},
      {"bytes", DType::u8, {3}, random_bytes(3, 106)},
      {"flags", DType::boolean, {2}, Bytes{0, 1}},
      {"scalar", DType::f32, {}, random_bytes(4, 107)},
      {"empty", DType::f32, {0, 3}, {}},
  };
}

/// Writes each tensor's bytes to <dir>/<i>.bin and returns Python lines building `tensors`
/// with NumPy (16-bit floats as raw uint16 bits, the others as their NumPy dtype).
std::string write_raw_inputs(const TempDir& dir, const std::vector<RawTensor>& tensors) {
  std::string py = "import numpy as np\ntensors = {}\n";
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const RawTensor& t = tensors[i];
    const std::string bin = dir.file(std::to_string(i) + ".bin");
    write_bytes(bin, t.bytes);
    std::string np_dtype;
    switch (t.dtype) {
      case DType::f64:
        np_dtype = "<f8";
        break;
      case DType::f32:
        np_dtype = "<f4";
        break;
      case DType::f16:
        np_dtype = "<f2";
        break;
      case DType::bf16:
        np_dtype = "<u2";
        break;
      case DType::i32:
        np_dtype = "<i4";
        break;
      case DType::u8:
        np_dtype = "u1";
        break;
      case DType::boolean:
        np_dtype = "?";
        break;
      default:
        ADD_FAILURE() << "no NumPy dtype for the test";
        break;
    }
    std::string shape = "(";
    for (Index d : t.shape) shape += std::to_string(d) + ",";
    shape += ")";
    const std::string array =
        "np.fromfile(r'" + bin + "', dtype='" + np_dtype + "').reshape(" + shape + ")";
    py += "tensors['" + t.name +
          "'] = " + (t.dtype == DType::bf16 ? "(" + array + ", 'BF16')" : array) + "\n";
  }
  return py;
}

void check_python_file(const std::string& path, const std::vector<RawTensor>& tensors,
                       const Metadata& metadata) {
  const SafetensorsReader r(path);
  EXPECT_EQ(r.size(), tensors.size());
  EXPECT_EQ(r.metadata(), metadata);
  for (const RawTensor& t : tensors) {
    ASSERT_TRUE(r.has(t.name)) << t.name;
    const TensorView v = r.get(t.name);
    EXPECT_EQ(v.dtype(), t.dtype) << t.name;
    EXPECT_EQ(v.shape(), t.shape) << t.name;
    EXPECT_TRUE(same_bytes(v, t.bytes)) << t.name;  // bit-exact
  }
  // The script puts 8-byte tensors first, so the f64 one maps in place.
  const Matrix<double> w = r.as_matrix<double>("model.layers.0.w");
  for (Index i = 0; i < 12; ++i) {
    double expected = 0;
    std::memcpy(&expected, tensors[0].bytes.data() + 8 * i, 8);
    EXPECT_TRUE(w.data()[i] == expected || (std::isnan(expected) && std::isnan(w.data()[i])));
  }
}

TEST(SafetensorsPython, NumPyWriterModule) {
  if (!python_has("numpy"))
    GTEST_SKIP() << python() << " with NumPy is not available (set RETENTION_PYTHON)";
  const fs::path script = scripts_dir() / "safetensors_write.py";
  ASSERT_TRUE(fs::exists(script)) << script << " is missing (set RETENTION_SOURCE_DIR)";
  TempDir dir;
  const std::vector<RawTensor> tensors = python_tensors();
  const std::string out = dir.file("numpy.safetensors");
  std::string py = "import sys\nsys.path.insert(0, r'" + scripts_dir().string() + "')\n" +
                   "import safetensors_write as sw\n" + write_raw_inputs(dir, tensors) +
                   "sw.save_file(tensors, r'" + out +
                   "', metadata={'source': 'numpy', 'n': '9'})\n";
  write_bytes(dir.file("drive.py"), Bytes(py.begin(), py.end()));
  ASSERT_TRUE(run_ok("'" + python() + "' '" + dir.file("drive.py") + "'"));
  check_python_file(out, tensors, {{"source", "numpy"}, {"n", "9"}});
}

TEST(SafetensorsPython, TorchCheckpointCli) {
  if (!python_has("numpy"))
    GTEST_SKIP() << python() << " with NumPy is not available (set RETENTION_PYTHON)";
  const fs::path script = scripts_dir() / "safetensors_write.py";
  ASSERT_TRUE(fs::exists(script)) << script << " is missing (set RETENTION_SOURCE_DIR)";
  TempDir dir;
  const std::vector<RawTensor> tensors = python_tensors();
  const std::string pt = dir.file("model.pt");
  const std::string out = dir.file("torch.safetensors");
  const std::string bad = dir.file("bad.safetensors");
  // One Python process (importing torch is slow): it saves a checkpoint, then runs the script as
  // __main__ twice. bf16 travels as int16 bits viewed as torch.bfloat16; nested dicts flatten
  // with '.'; without --key the non-tensor 'epoch' entry must be refused.
  std::string py =
      "import runpy, sys\n"
      "try:\n"
      "    import torch\n"
      "except ImportError:\n"
      "    sys.exit(77)\n" +
      write_raw_inputs(dir, tensors) +
      "sd = {}\n"
      "for k, v in tensors.items():\n"
      "    if isinstance(v, tuple):\n"
      "        t = torch.from_numpy(v[0].view(np.int16).copy()).view(torch.bfloat16)\n"
      "    else:\n"
      "        t = torch.from_numpy(v.copy())\n"
      "    sd[k] = t\n"
      "sd['model'] = {'layers': {'0': {'w': sd.pop('model.layers.0.w')}}}\n"
      "torch.save({'state_dict': sd, 'epoch': 3}, r'" +
      pt +
      "')\n"
      "def cli(*args):\n"
      "    sys.argv = [r'" +
      script.string() +
      "', *args]\n"
      "    try:\n"
      "        runpy.run_path(sys.argv[0], run_name='__main__')\n"
      "    except SystemExit as e:\n"
      "        return e.code\n"
      "    except TypeError:\n"
      "        return 1\n"
      "    return 0\n"
      "assert cli(r'" +
      pt + "', r'" + out +
      "', '--key', 'state_dict', '--metadata', 'format=pt', '--metadata', 'a=b=c') == 0\n"
      "assert cli(r'" +
      pt + "', r'" + bad + "') != 0\n";
  write_bytes(dir.file("drive.py"), Bytes(py.begin(), py.end()));
  const int status = run_status("'" + python() + "' '" + dir.file("drive.py") + "' >/dev/null");
  if (status == 77) GTEST_SKIP() << python() << " has no torch";
  ASSERT_EQ(status, 0);
  check_python_file(out, tensors, {{"format", "pt"}, {"a", "b=c"}});
  EXPECT_FALSE(fs::exists(bad));
}

TEST(SafetensorsPython, ReferencePackageReadsOurFiles) {
  if (!python_has("safetensors.numpy"))
    GTEST_SKIP() << "the safetensors Python package is not installed for " << python();
  TempDir dir;
  TensorMap map;
  map.add("a", random_matrix<double>(3, 4, 1))
      .add("b", Eigen::VectorXf(random_matrix<float>(5, 1, 2)))
      .add("h", Matrix<Eigen::half>(random_matrix<float>(2, 2, 3).cast<Eigen::half>()));
  const std::string path = dir.file("ours.safetensors");
  retention::io::write_safetensors(path, map, {{"k", "v"}});
  // The package validates the whole layout on load; each array is dumped raw for a byte compare.
  std::string py =
      "from safetensors.numpy import load_file\n"
      "from safetensors import safe_open\n"
      "t = load_file(r'" +
      path +
      "')\n"
      "assert safe_open(r'" +
      path +
      "', 'np').metadata() == {'k': 'v'}\n"
      "for k, v in t.items():\n"
      "    open(r'" +
      dir.file("") + "' + k + '.raw', 'wb').write(v.tobytes())\n";
  write_bytes(dir.file("check.py"), Bytes(py.begin(), py.end()));
  ASSERT_TRUE(run_ok("'" + python() + "' '" + dir.file("check.py") + "'"));
  for (const std::string& name : map.names()) {
    std::ifstream f(dir.file(name + ".raw"), std::ios::binary);
    const Bytes raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const TensorView v = map.get(name);
    EXPECT_TRUE(same_bytes(v, raw)) << name;
  }
}

}  // namespace
