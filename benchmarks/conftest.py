"""pytest-benchmark suite of the fused op against eager PyTorch, torch.compile and the peers.

    pytest benchmarks/                           # this machine's device, default matrix
    pytest benchmarks/ --bench-size quick        # a smoke run (one op, one shape)
    pytest benchmarks/ --bench-size full         # every op, dtype and shape
    pytest benchmarks/ --bench-dir out/          # where results.json / results.csv go (default bench-results/)

Not part of the default test run (pyproject's testpaths is tests/). Every measurement, and every
provider that could not run (with the reason), becomes a row: see distillkit/tools/bench/rows.py.
The suite imports only from distillkit.
"""

from __future__ import annotations

import pytest
import torch

from distillkit.tools.bench import measure
from distillkit.tools.bench.cases import OPS, SHAPES, make_case
from distillkit.tools.bench.providers import all_providers
from distillkit.tools.bench.rows import DEFAULT_DIR, RowWriter

# What each --bench-size runs. On CPU the shapes are scaled down (cases.CPU_MAX_ELEMENTS).
MATRIX = {
    "quick": {"time_ops": ["forward_kl"], "dtypes": ["fp32"], "time_shapes": ["small"],
              "modes": ["forward+backward"], "memory_ops": ["forward_kl"], "memory_shapes": ["small"], "memory_dtypes": ["fp32"],
              "traffic_ops": ["forward_kl", "jsd", "ce"], "traffic_shapes": ["small"], "compile_ops": ["forward_kl"]},
    "default": {"time_ops": ["forward_kl", "jsd"], "dtypes": ["fp32", "bf16"], "time_shapes": ["peer"],
                "modes": ["forward", "backward", "forward+backward"], "memory_ops": ["forward_kl", "jsd"],
                "memory_shapes": ["peer"], "memory_dtypes": ["fp32", "bf16"], "traffic_ops": OPS, "traffic_shapes": ["small", "peer"],
                "compile_ops": ["forward_kl"]},
    "full": {"time_ops": OPS, "dtypes": ["fp32", "bf16", "fp16"], "time_shapes": list(SHAPES),
             "modes": ["forward", "backward", "forward+backward"], "memory_ops": OPS, "memory_shapes": list(SHAPES), "memory_dtypes": ["fp32", "bf16", "fp16"],
             "traffic_ops": OPS, "traffic_shapes": list(SHAPES), "compile_ops": OPS},
}


def pytest_addoption(parser):
    group = parser.getgroup("distillkit benchmarks")
    group.addoption("--bench-size", choices=list(MATRIX), default="default", help="benchmark matrix size")
    group.addoption("--bench-dir", default=DEFAULT_DIR, help="directory for results.json / results.csv")
    group.addoption("--bench-device", choices=["auto", "cpu", "cuda"], default="auto", help="device to time on")


def _device(config) -> str:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device here")
    return choice


def pytest_configure(config):
    config._distillkit_writer = RowWriter(_device(config))


def pytest_generate_tests(metafunc):
    """Parametrize from the matrix of --bench-size (fixtures named case_spec / provider_name / mode)."""
    config = metafunc.config
    matrix = MATRIX[config.getoption("--bench-size")]
    device = _device(config)
    kind = getattr(metafunc.module, "BENCH_KIND", None)
    if kind is None:
        return
    if "case_spec" not in metafunc.fixturenames:
        if "provider_name" in metafunc.fixturenames:
            metafunc.parametrize("provider_name", [p.name for p in all_providers()])
        return
    ops, shapes = matrix[f"{kind}_ops"], matrix[f"{kind}_shapes"]
    dtypes = matrix.get(f"{kind}_dtypes", matrix["dtypes"])
    specs = [(op, shape, dtype) for shape in shapes for dtype in dtypes for op in ops]
    metafunc.parametrize("case_spec", specs, ids=[f"{op}-{shape}-{dtype}" for op, shape, dtype in specs])
    if "provider_name" in metafunc.fixturenames:
        names = [p.name for p in all_providers()]
        metafunc.parametrize("provider_name", names)
    if "mode" in metafunc.fixturenames:
        modes = matrix["modes"] if kind == "time" else (["forward+backward"] if device == "cpu" else matrix["modes"])
        metafunc.parametrize("mode", modes)


@pytest.fixture(scope="session")
def device(request) -> str:
    return _device(request.config)


@pytest.fixture(scope="session")
def matrix(request) -> dict:
    return MATRIX[request.config.getoption("--bench-size")]


@pytest.fixture(scope="session")
def writer(request) -> RowWriter:
    return request.config._distillkit_writer


@pytest.fixture
def case(case_spec, device):
    op, shape, dtype = case_spec
    return make_case(op, shape, dtype, device)


def _derived_rows(writer: RowWriter) -> None:
    """Achieved bandwidth / fraction of peak (GPU time + counted traffic) and the modeled H100 time."""
    from distillkit.tools.bench.cases import Case

    traffic = {}
    for row in list(writer.rows):
        if row["metric"] == "traffic_units" and row["status"] == "ok":
            key = (row["op"], row["provider"], row["mode"], row["shape"], row["dtype"])
            traffic[key] = row["value"]
            # The roofline assumes the Triton kernels on an H100: model it for every counted provider.
            case = Case(row["op"], row["n"], row["v"], row["dtype"], row["shape"], row["nominal_n"])
            nominal = Case(row["op"], row["nominal_n"], row["v"], row["dtype"], row["shape"], row["nominal_n"])
            writer.add(nominal, row["provider"], row["mode"], "modeled_h100_time", 1e3 * measure.modeled_seconds(
                row["value"], case), "ms", modeled=True,
                note=f"modeled: traffic units x nominal N*V*elem / 3.35 TB/s (H100 SXM) at N={row['nominal_n']}")
    if writer.device != "cuda":
        return
    peak = measure.peak_bandwidth(torch.cuda.get_device_name())
    for row in list(writer.rows):
        if row["metric"] != "time" or row["status"] != "ok":
            continue
        units = traffic.get((row["op"], row["provider"], row["mode"], row["shape"], row["dtype"]))
        if units is None:
            continue
        case = Case(row["op"], row["n"], row["v"], row["dtype"], row["shape"], row["nominal_n"])
        bandwidth = units * case.unit_bytes / (row["value"] / 1e3)
        writer.add(case, row["provider"], row["mode"], "achieved_bandwidth", bandwidth / 1e9, "GB/s",
                   note="counted traffic / measured median time")
        if peak:
            writer.add(case, row["provider"], row["mode"], "fraction_of_peak_bandwidth", bandwidth / peak, "",
                       note=f"peak {peak / 1e12:.2f} TB/s")


def pytest_sessionfinish(session, exitstatus):
    writer: RowWriter = getattr(session.config, "_distillkit_writer", None)
    if writer is None or not writer.rows:
        return
    _derived_rows(writer)
    json_path, csv_path = writer.write(session.config.getoption("--bench-dir"))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        ok = sum(r["status"] == "ok" for r in writer.rows)
        reporter.write_line(f"distillkit benchmarks: {ok} measured rows, {len(writer.rows) - ok} skipped; "
                            f"wrote {json_path} and {csv_path}")
