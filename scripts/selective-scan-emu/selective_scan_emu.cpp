// Runs kernels/selective_scan.cu's forward and backward on the CPU through the launch sequence
// the launcher follows (grids, block sizes, shared memory, buffers, order), for one case that
// run.py wrote to a directory: config.txt ("B T D N z D bias h0 dhT softplus fwd_chunks
// bwd_chunks R reset": sizes, 0/1 presence flags, chunks per segment for each direction, the
// column offset R of B in its x_proj-like row, and whether restarts are given) and the inputs
// as raw files. z and dz live in
// the second half of [B, T, 2D] rows, B and C in [B, T, R + 2N] rows (R odd: rows not 16-byte
// aligned), as in the Mamba model. Workspaces start as NaN, so a read of anything the kernels
// did not write shows. Writes the outputs and gradients back as raw files.
//
// Built by run.py with the kernel source as selective_scan_cpu.cu (the emulator's header, the
// prelude and the source, rendered by scripts/kernel-emu/emu.py) and one of
// -DKERNEL_DTYPE_{F32,BF16,F16}.
#include <algorithm>
#include <fstream>
#include <string>

#include "selective_scan_cpu.cu"

static std::string dir;

template <class T>
static std::vector<T> read(const char* name, size_t n) {
  std::vector<T> v(n);
  std::ifstream f(dir + "/" + name, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), n * sizeof(T));
  if (!f || (size_t)f.gcount() != n * sizeof(T)) {
    fprintf(stderr, "%s/%s: expected %zu bytes\n", dir.c_str(), name, n * sizeof(T));
    exit(2);
  }
  return v;
}

template <class T>
static void write(const char* name, const std::vector<T>& v) {
  std::ofstream f(dir + "/" + name, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

static unsigned cdiv(long long a, long long b) { return (unsigned)((a + b - 1) / b); }

static int padded_states_host(int n) {
  int p = 4;
  while (p < n) p *= 2;
  return p;
}

static Rows rows(void* p, long long sb, long long st) {
  Rows r;
  r.p = p, r.sb = sb, r.st = st;
  return r;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  dir = argv[1];
  int B, T, D, N, has_z, has_D, has_bias, has_h0, has_dhT, softplus, fwd_chunks, bwd_chunks, R,
      has_reset;
  {
    std::ifstream cf(dir + "/config.txt");
    cf >> B >> T >> D >> N >> has_z >> has_D >> has_bias >> has_h0 >> has_dhT >> softplus >>
        fwd_chunks >> bwd_chunks >> R >> has_reset;
    if (!cf) return 2;
  }
  const long long BTD = (long long)B * T * D, BTN = (long long)B * T * N;
  const long long BDN = (long long)B * D * N, BT = (long long)B * T;
  auto u = read<input_t>("u.bin", BTD), delta = read<input_t>("delta.bin", BTD);
  auto dout = read<input_t>("dout.bin", BTD);
  auto Bc = read<input_t>("B.bin", BTN), Cc = read<input_t>("C.bin", BTN);
  auto A = read<float>("A.bin", (size_t)D * N);
  std::vector<float> Dv, bias, h0, dhT;
  if (has_D) Dv = read<float>("D.bin", D);
  if (has_bias) bias = read<float>("bias.bin", D);
  if (has_h0) h0 = read<float>("h0.bin", BDN);
  if (has_dhT) dhT = read<float>("dhT.bin", BDN);
  std::vector<char> reset;  // bool bytes
  if (has_reset) reset = read<char>("reset.bin", BT);
  std::vector<input_t> xz(BT * 2 * D), xp(BT * (R + 2 * N));
  if (has_z) {
    auto z = read<input_t>("z.bin", BTD);
    for (long long i = 0; i < BT; ++i)
      for (int d = 0; d < D; ++d) xz[i * 2 * D + D + d] = z[i * D + d];
  }
  for (long long i = 0; i < BT; ++i)
    for (int n = 0; n < N; ++n) {
      xp[i * (R + 2 * N) + R + n] = Bc[i * N + n];
      xp[i * (R + 2 * N) + R + N + n] = Cc[i * N + n];
    }

  const int chunks = (int)cdiv(T, SS_CHUNK), NP = padded_states_host(N), NG = NP / SS_NS;
  std::vector<input_t> out(BTD), ypre(BTD), du(BTD), ddelta(BTD), dzrows(BT * 2 * D);
  std::vector<input_t> dB(BTN), dC(BTN);
  std::vector<float> hT(BDN), ckpt((size_t)B * chunks * D * N, NAN), dA((size_t)D * N);
  std::vector<float> dD(D), dbias(D), dh0(BDN);

  ScanParams p;
  memset(&p, 0, sizeof p);
  p.u = rows(u.data(), (long long)T * D, D);
  p.delta = rows(delta.data(), (long long)T * D, D);
  p.z = rows(has_z ? xz.data() + D : nullptr, (long long)T * 2 * D, 2 * D);
  p.Bm = rows(xp.data() + R, (long long)T * (R + 2 * N), R + 2 * N);
  p.Cm = rows(xp.data() + R + N, (long long)T * (R + 2 * N), R + 2 * N);
  p.out = rows(out.data(), (long long)T * D, D);
  p.ypre = rows(has_z ? ypre.data() : nullptr, (long long)T * D, D);
  p.A = A.data();
  p.Dskip = has_D ? Dv.data() : nullptr;
  p.bias = has_bias ? bias.data() : nullptr;
  p.h0 = has_h0 ? h0.data() : nullptr;
  p.hT = hT.data();
  p.ckpt = ckpt.data();
  p.reset = has_reset ? reinterpret_cast<const bool*>(reset.data()) : nullptr;
  p.B = B, p.T = T, p.D = D, p.N = N, p.softplus = softplus;

  {  // Forward.
    const int threads = std::max(128, 8 * NG), DC = threads / NG;
    p.seg_chunks = std::min(fwd_chunks, chunks);
    p.segments = (int)cdiv(chunks, p.seg_chunks);
    const int S = p.segments;
    std::vector<float> seg((size_t)S * BDN, NAN), dsum((size_t)S * B * D, NAN);
    p.seg = seg.data(), p.dsum = dsum.data();
    if (S > 1) {
      emu_launch({cdiv(D, DC), (unsigned)B, (unsigned)(S - 1)}, threads,
                 4u * SS_CHUNK * (2 * DC + NP), [&] { ENTRY(selective_scan_fwd_states)(p); });
      p.reverse = 0;
      emu_launch({cdiv(BDN, 256), 1, 1}, 256, 0, [&] { ENTRY(selective_scan_carry)(p); });
    }
    emu_launch({cdiv(D, DC), (unsigned)B, (unsigned)S}, threads,
               4u * SS_CHUNK * (3 * DC + 2 * NP + threads), [&] { ENTRY(selective_scan_fwd)(p); });
  }
  {  // Backward.
    const int NGB = std::min(NP / 4, 4), SP = 4 * NGB, threads = 32 * NGB, passes = NP / SP;
    p.seg_chunks = std::min(bwd_chunks, chunks);
    p.segments = (int)cdiv(chunks, p.seg_chunks);
    const int S = p.segments, tiles = (int)cdiv(D, 64);
    std::vector<float> seg((size_t)S * BDN, NAN), dsum((size_t)S * B * D, NAN);
    std::vector<float> part_bc((size_t)tiles * BTN * 2, NAN), part_a((size_t)S * BDN, NAN);
    std::vector<float> part_dd((size_t)S * B * 2 * D, NAN);
    std::vector<float> work(passes > 1 ? (size_t)S * BDN : 0, NAN);
    p.seg = seg.data(), p.dsum = dsum.data(), p.part_bc = part_bc.data();
    p.part_a = part_a.data(), p.part_dd = part_dd.data();
    p.work = passes > 1 ? work.data() : nullptr;
    p.dout = rows(dout.data(), (long long)T * D, D);
    p.dhT = has_dhT ? dhT.data() : nullptr;
    p.du = rows(du.data(), (long long)T * D, D);
    p.ddelta = rows(ddelta.data(), (long long)T * D, D);
    p.dz = rows(has_z ? dzrows.data() + D : nullptr, (long long)T * 2 * D, 2 * D);
    p.dB = rows(dB.data(), (long long)T * N, N);
    p.dC = rows(dC.data(), (long long)T * N, N);
    p.dh0 = has_h0 ? dh0.data() : nullptr;
    p.dA = dA.data(), p.dD = has_D ? dD.data() : nullptr;
    p.dbias = has_bias ? dbias.data() : nullptr;
    if (S > 1) {
      emu_launch({(unsigned)tiles, (unsigned)B, (unsigned)(S - 1)}, threads,
                 4u * (SS_CHUNK * (3 * 64 + SP) + 16 * threads),
                 [&] { ENTRY(selective_scan_bwd_dh)(p); });
      p.reverse = 1;
      emu_launch({cdiv(BDN, 256), 1, 1}, 256, 0, [&] { ENTRY(selective_scan_carry)(p); });
    }
    emu_launch({(unsigned)tiles, (unsigned)B, (unsigned)S}, threads,
               4u * (SS_CHUNK * (5 * 64 + 2 * SP) + threads * (8 * SS_SUBS + 12 * SS_SUB)),
               [&] { ENTRY(selective_scan_bwd)(p); });
    emu_launch({cdiv(2 * BTN, 256), 1, 1}, 256, 0, [&] { ENTRY(selective_scan_reduce_bc)(p); });
    emu_launch({cdiv((long long)D * N + 2 * D, 256), 1, 1}, 256, 0,
               [&] { ENTRY(selective_scan_reduce_params)(p); });
  }
  std::vector<input_t> dz(BTD);
  for (long long i = 0; i < BT; ++i)
    for (int d = 0; d < D; ++d) dz[i * D + d] = dzrows[i * 2 * D + D + d];
  write("out.bin", out), write("ypre.bin", ypre), write("hT.bin", hT);
  write("du.bin", du), write("ddelta.bin", ddelta), write("dz.bin", dz);
  write("dB.bin", dB), write("dC.bin", dC), write("dA.bin", dA);
  write("dD.bin", dD), write("dbias.bin", dbias), write("dh0.bin", dh0);
  return 0;
}
