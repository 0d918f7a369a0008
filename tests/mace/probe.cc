// The project's MACE probe (built by scripts/build_mace.sh against the real libmace): a small net of MACE ops
// run on MACE's OpenCL runtime, the way an app starts, with its cache at a path the caller names.
//
//   probe --cache FILE [--binary FILE] [--policy same|none] [--net full|relu]
//
// The net (GPU image memory, so MACE adds its buffer/image transforms): in -> Activation RELU -> a;
// a -> Activation TANH -> b; Eltwise SUM(a, b) -> out. Programs with different build options come out of
// it: activation with -DUSE_RELU and with -DUSE_TANH, eltwise, buffer_to_image, image_to_buffer.
// `--net relu` is the first op alone (fewer programs: a source change to eltwise.cl does not touch it).
//
// It prints one JSON object on stdout: "ok" (the output is right), "max_error", "init_ms", "run_ms",
// "mace_version", and the programs by where MACE took them from, read from MACE's own log lines
// (MACE_CPP_MIN_VLOG_LEVEL=3, which the probe sets): "cache", "precompiled", "source", "cache_failed".
// MACE's whole log (it writes it on stdout) is copied to stderr. Exit 0 when the output is right, 1 otherwise, 2 on bad usage.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <unistd.h>

#include "mace/proto/mace.pb.h"
#include "mace/public/mace.h"

namespace {

const int kN = 1, kH = 8, kW = 8, kC = 4;

void AddArg(mace::OperatorDef *op, const std::string &name, int value) {
  mace::Argument *arg = op->add_arg();
  arg->set_name(name);
  arg->set_i(value);
}

mace::OperatorDef *AddOp(mace::NetDef *net, const std::string &type, const std::vector<std::string> &inputs,
                         const std::string &output) {
  mace::OperatorDef *op = net->add_op();
  op->set_name(output);
  op->set_type(type);
  for (const std::string &input : inputs) op->add_input(input);
  op->add_output(output);
  op->add_output_type(mace::DT_FLOAT);
  mace::OutputShape *shape = op->add_output_shape();
  for (int d : {kN, kH, kW, kC}) shape->add_dims(d);
  AddArg(op, "has_data_format", 1);
  AddArg(op, "T", static_cast<int>(mace::DT_FLOAT));
  AddArg(op, "data_format", static_cast<int>(mace::DataFormat::AUTO));
  return op;
}

void AddActivation(mace::NetDef *net, const std::string &input, const std::string &output, const char *kind) {
  mace::OperatorDef *op = AddOp(net, "Activation", {input}, output);
  mace::Argument *arg = op->add_arg();
  arg->set_name("activation");
  arg->set_s(kind);
}

void AddInfo(mace::InputOutputInfo *info, const std::string &name) {
  info->set_name(name);
  for (int d : {kN, kH, kW, kC}) info->add_dims(d);
  info->set_data_type(mace::DT_FLOAT);
  info->set_data_format(static_cast<int>(mace::DataFormat::NHWC));
}

std::string Quote(const std::string &text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out + "\"";
}

// The programs MACE names in lines "... Program from <origin>: <key>".
std::map<std::string, std::vector<std::string>> Origins(const std::string &log) {
  const char *kinds[][2] = {{"Program from Cache: ", "cache"}, {"Program from precompiled binary: ", "precompiled"},
                            {"Program from source: ", "source"}};
  std::map<std::string, std::vector<std::string>> found = {
      {"cache", {}}, {"precompiled", {}}, {"source", {}}, {"cache_failed", {}}};
  size_t start = 0;
  while (start < log.size()) {
    size_t end = log.find('\n', start);
    if (end == std::string::npos) end = log.size();
    std::string line = log.substr(start, end - start);
    for (auto &kind : kinds) {
      size_t at = line.find(kind[0]);
      if (at != std::string::npos) found[kind[1]].push_back(line.substr(at + strlen(kind[0])));
    }
    size_t failed = line.find("Build program ");
    size_t from_cache = line.find(" from Cache failed");
    if (failed != std::string::npos && from_cache != std::string::npos && from_cache > failed) {
      found["cache_failed"].push_back(line.substr(failed + 14, from_cache - failed - 14));
    }
    start = end + 1;
  }
  return found;
}

int Usage() {
  fprintf(stderr, "usage: probe --cache FILE [--binary FILE] [--policy same|none] [--net full|relu]\n");
  return 2;
}

}  // namespace

int main(int argc, char **argv) {
  std::string cache, binary, policy = "same", net_kind = "full";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--cache") cache = argv[i + 1];
    else if (flag == "--binary") binary = argv[i + 1];
    else if (flag == "--policy") policy = argv[i + 1];
    else if (flag == "--net") net_kind = argv[i + 1];
    else return Usage();
  }
  if (cache.empty() || argc % 2 == 0 || (policy != "same" && policy != "none") ||
      (net_kind != "full" && net_kind != "relu")) {
    return Usage();
  }
  setenv("MACE_CPP_MIN_VLOG_LEVEL", "3", 1);

  // MACE logs with printf (stdout): keep its lines in a file while it works, to read which programs came
  // from where; they go to stderr afterwards, and stdout carries only the probe's JSON.
  fflush(stdout);
  FILE *log_file = tmpfile();
  int saved_stdout = dup(1);
  if (log_file == nullptr || saved_stdout < 0 || dup2(fileno(log_file), 1) < 0) {
    perror("probe: cannot capture MACE's log");
    return 1;
  }

  mace::NetDef net;
  mace::Argument *arg = net.add_arg();
  arg->set_name("runtime_type");
  arg->set_i(static_cast<int>(mace::RuntimeType::RT_OPENCL));
  arg = net.add_arg();
  arg->set_name("opencl_mem_type");
  arg->set_i(static_cast<int>(mace::MemoryType::GPU_IMAGE));
  std::string output = "a";
  AddActivation(&net, "in", "a", "RELU");
  if (net_kind == "full") {
    AddActivation(&net, "a", "b", "TANH");
    AddArg(AddOp(&net, "Eltwise", {"a", "b"}, "out"), "type", 0);  // SUM
    output = "out";
  }
  AddInfo(net.add_input_info(), "in");
  AddInfo(net.add_output_info(), output);

  mace::GPUContextBuilder builder;
  builder.SetOpenCLCacheFullPath(cache);
  builder.SetOpenCLCacheReusePolicy(policy == "none" ? mace::OpenCLCacheReusePolicy::REUSE_NONE
                                                     : mace::OpenCLCacheReusePolicy::REUSE_SAME_GPU);
  if (!binary.empty()) builder.SetOpenCLBinaryPaths({binary});
  mace::MaceEngineConfig config;
  config.SetGPUContext(builder.Finalize());

  const int count = kN * kH * kW * kC;
  std::shared_ptr<float> in_data(new float[count], std::default_delete<float[]>());
  std::shared_ptr<float> out_data(new float[count], std::default_delete<float[]>());
  for (int i = 0; i < count; ++i) in_data.get()[i] = static_cast<float>(i % 17 - 8) * 0.25f;
  const std::vector<int64_t> shape = {kN, kH, kW, kC};
  std::map<std::string, mace::MaceTensor> inputs = {{"in", mace::MaceTensor(shape, in_data)}};
  std::map<std::string, mace::MaceTensor> outputs = {{output, mace::MaceTensor(shape, out_data)}};

  auto t0 = std::chrono::steady_clock::now();
  mace::MaceEngine engine(config);
  const std::vector<std::string> input_names = {"in"}, output_names = {output};
  mace::MaceStatus init = engine.Init(&net, input_names, output_names, static_cast<const unsigned char *>(nullptr),
                                      static_cast<int64_t>(0), static_cast<bool *>(nullptr));
  auto t1 = std::chrono::steady_clock::now();
  mace::MaceStatus run = init == mace::MaceStatus::MACE_SUCCESS ? engine.Run(inputs, &outputs) : init;
  auto t2 = std::chrono::steady_clock::now();

  fflush(stdout);
  dup2(saved_stdout, 1);
  std::string log;
  rewind(log_file);
  char chunk[4096];
  size_t got;
  while ((got = fread(chunk, 1, sizeof(chunk), log_file)) > 0) log.append(chunk, got);
  fwrite(log.data(), 1, log.size(), stderr);

  double max_error = 0;
  for (int i = 0; i < count; ++i) {
    float a = std::max(in_data.get()[i], 0.0f);
    float want = net_kind == "full" ? a + std::tanh(a) : a;
    max_error = std::max(max_error, static_cast<double>(std::fabs(out_data.get()[i] - want)));
  }
  bool ok = run == mace::MaceStatus::MACE_SUCCESS && max_error <= 1e-3;
  std::chrono::duration<double, std::milli> init_ms = t1 - t0, run_ms = t2 - t1;
  printf("{\"ok\": %s, \"status\": %d, \"max_error\": %g, \"init_ms\": %.3f, \"run_ms\": %.3f, "
         "\"mace_version\": %s", ok ? "true" : "false", static_cast<int>(run.code()), max_error, init_ms.count(),
         run_ms.count(), Quote(mace::MaceVersion()).c_str());
  for (auto &origin : Origins(log)) {
    printf(", %s: [", Quote(origin.first).c_str());
    for (size_t i = 0; i < origin.second.size(); ++i) {
      printf("%s%s", i ? ", " : "", Quote(origin.second[i]).c_str());
    }
    printf("]");
  }
  printf("}\n");
  return ok ? 0 : 1;
}
