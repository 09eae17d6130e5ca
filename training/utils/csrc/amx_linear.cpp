// A bf16 linear layer for a few rows (one decoding step) on AMX tiles, from weights laid out as the tiles read them.
// See training/utils/model/amx_linear.py for why and when it is used.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kMaxRows = 16;    // rows of an A / C tile
constexpr int64_t kDepth = 32;      // bf16 values of k in one tile product
constexpr int64_t kBlockCols = 16;  // output columns of one C tile (fp32)
constexpr int64_t kGroup = 4;       // C tiles (blocks of 16 columns) accumulated side by side: tiles 0-3
constexpr int64_t kTileBytes = 1024;
constexpr int64_t kPrefetchAhead = 4 * kGroup * kTileBytes;  // bytes of weights ahead of the ones being read

struct TileConfig {  // the 64-byte operand of LDTILECFG (palette 1)
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX tile state only to processes that ask for it (arch_prctl ARCH_REQ_XCOMP_PERM).
bool tiles_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
  return permitted;
}

// Tiles 0-3: C (rows x 16 fp32), 4: A (rows x 32 bf16), 5-7: B (16 pairs of k x 16 columns).
void configure_tiles(int64_t rows) {
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.rows[t] = static_cast<uint8_t>(rows);
    config.colsb[t] = 64;
  }
  for (int t = 5; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// out[m, n] for rows [row0, row0 + rows) and the column groups [first, last) of 64 columns.
void column_groups(const uint16_t* x, int64_t k_size, const char* weights, const at::BFloat16* bias, bool relu,
                   at::BFloat16* out, int64_t n_size, int64_t row0, int64_t rows, int64_t first, int64_t last) {
  const int64_t depth_blocks = k_size / kDepth;
  const int64_t group_bytes = depth_blocks * kGroup * kTileBytes;
  alignas(64) float sums[kGroup][kMaxRows][kBlockCols];
  const uint16_t* a = x + row0 * k_size;
  for (int64_t group = first; group < last; ++group) {
    const char* b = weights + group * group_bytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < depth_blocks; ++kb, b += kGroup * kTileBytes) {
      for (int64_t byte = 0; byte < kGroup * kTileBytes; byte += 64) _mm_prefetch(b + kPrefetchAhead + byte, _MM_HINT_T0);
      _tile_loadd(4, a + kb * kDepth, k_size * 2);
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + kTileBytes, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b + 2 * kTileBytes, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b + 3 * kTileBytes, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
    for (int64_t j = 0; j < kGroup; ++j) {
      const int64_t n0 = group * kGroup * kBlockCols + j * kBlockCols;
      for (int64_t m = 0; m < rows; ++m) {
        at::BFloat16* row = out + (row0 + m) * n_size + n0;
        for (int64_t c = 0; c < kBlockCols; ++c) {
          float value = sums[j][m][c] + (bias ? static_cast<float>(bias[n0 + c]) : 0.f);
          row[c] = at::BFloat16(relu && value < 0.f ? 0.f : value);
        }
      }
    }
  }
}

}  // namespace

// x [M, K] bf16 (contiguous), weights [N / 64, K / 32, 4, 16, 32] bf16 (amx_linear.py's layout), bias [N] bf16 or
// empty -> [M, N] bf16 = x W^T + bias (then ReLU when `relu`).
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& bias, bool relu) {
  TORCH_CHECK(tiles_permitted(), "amx_linear: the kernel may not use AMX tiles in this process");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weights.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
              x.is_contiguous() && weights.is_contiguous() && weights.dim() == 5 && weights.size(2) == kGroup &&
              weights.size(3) == 16 && weights.size(4) == kDepth && x.size(1) == weights.size(1) * kDepth,
              "amx_linear: shapes");
  const int64_t m_size = x.size(0), k_size = x.size(1), groups = weights.size(0);
  const int64_t n_size = groups * kGroup * kBlockCols;
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kBFloat16 && bias.is_contiguous() &&
                                    bias.numel() == n_size), "amx_linear: bias");
  auto out = torch::empty({m_size, n_size}, x.options());
  if (m_size == 0) return out;
  const auto* a = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* b = reinterpret_cast<const char*>(weights.data_ptr());
  const at::BFloat16* bias_values = bias.numel() ? bias.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t row0 = 0; row0 < m_size; row0 += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, m_size - row0);
      configure_tiles(rows);
      column_groups(a, k_size, b, bias_values, relu, o, n_size, row0, rows, first, last);
    }
    _tile_release();
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("amx_ready", &tiles_permitted, "whether this process may use AMX tiles");
  module.def("amx_linear", &amx_linear, "x W^T + bias (ReLU) for a few bf16 rows on AMX tiles");
}
