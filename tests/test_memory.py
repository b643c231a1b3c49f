"""The memory at hand read from the process's limits (address space, cgroup, MemAvailable), the margin
``mode="auto"`` keeps, and running out of memory anyway named with the mode and the ways out."""
from __future__ import annotations

import resource

import jax
import pytest

import swapjax
from conftest import fixed_lr, mlp_loss
from swapjax import blocks, holding, memory, pytree

GiB = 2**30


@pytest.fixture
def proc(tmp_path, monkeypatch):
    """/proc and /sys/fs/cgroup as files under tmp_path; no rlimit unless a test sets one."""
    (tmp_path / "meminfo").write_text("MemTotal:       24683772 kB\nMemAvailable:    8388608 kB\n")
    (tmp_path / "status").write_text("Name:\tpython\nVmPeak:\t 3145728 kB\nVmSize:\t 2097152 kB\nVmData:\t 1048576 kB\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    monkeypatch.setattr(memory, "PROC_MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(memory, "PROC_STATUS", str(tmp_path / "status"))
    monkeypatch.setattr(memory, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(memory, "CGROUP_ROOT", str(tmp_path / "sys"))
    rlimits = {}
    monkeypatch.setattr(resource, "getrlimit",
                        lambda which: (rlimits.get(which, resource.RLIM_INFINITY), resource.RLIM_INFINITY))
    return tmp_path, rlimits


def _write(root, files: dict):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_limits_without_a_limit_are_mem_available(proc):
    assert memory.process_limits() == memory.Limits(8 * GiB, None, None, None)
    bound = memory.process_limits().bound()
    assert bound == 8 * GiB and bound.limit == "MemAvailable"


def test_address_space_limit_counts_the_virtual_size_and_a_reserve(proc):
    """RLIMIT_AS counts VmSize (2 GiB here), not the resident set, and keeps ADDRESS_SPACE_RESERVE out."""
    tmp, rlimits = proc
    (tmp / "meminfo").write_text("MemAvailable:   16777216 kB\n")  # 16 GiB free on the host
    rlimits[resource.RLIMIT_AS] = 12_000_000 * 1024  # ulimit -v 12000000
    headroom = 12_000_000 * 1024 - 2 * GiB - memory.ADDRESS_SPACE_RESERVE
    assert memory.rlimit_headroom("AS") == headroom
    bound = memory.process_limits().bound()
    assert bound == headroom < 16 * GiB and bound.limit == "the address-space limit, ulimit -v"
    rlimits[resource.RLIMIT_AS] = 2 * GiB + 100  # below VmSize plus the reserve: nothing left
    assert memory.rlimit_headroom("AS") == 0
    rlimits[resource.RLIMIT_DATA] = 4 * GiB  # ulimit -d: against VmData (1 GiB)
    assert memory.rlimit_headroom("DATA") == 3 * GiB - memory.ADDRESS_SPACE_RESERVE


def test_cgroup_v2_limit_minus_usage_without_page_cache_least_over_ancestors(proc):
    tmp, _ = proc
    (tmp / "cgroup").write_text("0::/user.slice/job\n")
    sys = tmp / "sys"
    _write(sys, {"user.slice/job/memory.max": f"{3 * GiB}\n", "user.slice/job/memory.current": f"{GiB}\n",
                 "user.slice/job/memory.stat": f"anon {GiB // 2}\ninactive_file {GiB // 4}\n",
                 "user.slice/memory.max": "max\n", "user.slice/memory.current": f"{5 * GiB}\n"})
    assert memory.cgroup_headroom() == 3 * GiB - (GiB - GiB // 4)
    bound = memory.process_limits().bound()
    assert bound == 3 * GiB - 3 * GiB // 4 and bound.limit == "the cgroup's memory limit"
    # an ancestor with less room left binds
    _write(sys, {"user.slice/memory.max": f"{6 * GiB}\n"})
    assert memory.cgroup_headroom() == GiB
    # "max" everywhere: no cgroup bound
    _write(sys, {"user.slice/job/memory.max": "max\n", "user.slice/memory.max": "max\n"})
    assert memory.cgroup_headroom() is None


def test_cgroup_v1_and_a_container_whose_namespace_hides_the_path(proc):
    tmp, _ = proc
    (tmp / "cgroup").write_text("5:devices:/\n4:memory:/process_api/abc\n0::/\n")
    v1 = tmp / "sys" / "memory"
    _write(v1, {"process_api/abc/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
                "process_api/abc/memory.usage_in_bytes": f"{GiB}\n",
                "process_api/memory.limit_in_bytes": f"{2 * GiB}\n",
                "process_api/memory.usage_in_bytes": f"{3 * GiB // 2}\n",
                "process_api/memory.stat": f"cache 0\ntotal_inactive_file {GiB // 4}\n"})
    assert memory.cgroup_headroom() == 2 * GiB - (3 * GiB // 2 - GiB // 4)
    # in a container the mount's root is the container's own cgroup, the path in /proc/self/cgroup not there
    (tmp / "cgroup").write_text("4:memory:/docker/0123\n")
    _write(v1, {"memory.limit_in_bytes": f"{4 * GiB}\n", "memory.usage_in_bytes": f"{GiB}\n"})
    assert memory.cgroup_headroom() == 3 * GiB
    assert memory.process_limits().bound().limit == "the cgroup's memory limit"


def test_estimate_names_the_bound_and_auto_keeps_the_margin(proc, trained_mlp, prune_batch, monkeypatch, capsys):
    """A small problem under an address-space limit: the in-memory estimate fits in what the limit leaves
    but not within MEMORY_FRACTION of it, so auto takes the matrix-free mode (the old choice: in memory)."""
    _, rlimits = proc
    lay = pytree.layout(trained_mlp)
    monkeypatch.setattr(memory, "MIN_BLOCK_WIDTH", 10**9)  # no blocks (tested below)
    free = memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)
    assert free.available == 8 * GiB and free.limit == "MemAvailable"
    headroom = int(free.in_memory / 0.85)  # in memory would take 85% of it
    rlimits[resource.RLIMIT_AS] = 2 * GiB + memory.ADDRESS_SPACE_RESERVE + headroom
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)
    assert est.available == headroom and est.budget == int(0.75 * headroom)
    assert est.in_memory <= est.available and est.in_memory > est.budget and est.matrix_free < est.budget
    assert "available (the address-space limit, ulimit -v)" in est.describe()
    assert holding.choose("auto", fixed_lr(), None, est).mode == "matrix-free"
    assert "auto keeps within 75% of it): pruning matrix-free" in capsys.readouterr().err
    assert holding.choose("in-memory", fixed_lr(), None, est).mode == "in-memory"  # asked for: within all of it
    rlimits[resource.RLIMIT_AS] = 2 * GiB + memory.ADDRESS_SPACE_RESERVE + int(free.in_memory / 0.7)
    assert holding.choose("auto", fixed_lr(), None,
                          memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)).mode == "in-memory"


def test_the_10M_mlp_figures_go_matrix_free():
    """The issue's figures: blocks at 20.77 of 21.60 GiB were taken over 1.99 GiB matrix-free."""
    est = memory.Estimate(in_memory=int(50 * GiB), matrix_free=int(1.99 * GiB), available=int(21.60 * GiB),
                          blocked=int(20.77 * GiB), block_width=2_503_680)
    hold = holding.choose("auto", swapjax.SWAP(), None, est)
    assert hold.mode == "matrix-free" and hold.others == ("in-memory", "blocked")
    # blocks within the margin but over half of it, matrix-free under half: the lower peak
    roomy = est._replace(blocked=int(0.6 * est.available))
    assert holding.choose("auto", swapjax.SWAP(), None, roomy).mode == "matrix-free"
    # blocks under half: blocks (before matrix-free, as before)
    assert holding.choose("auto", swapjax.SWAP(), None, est._replace(blocked=int(0.45 * est.available))).mode == "blocked"
    # neither under half: the first within the margin
    assert holding.choose("auto", swapjax.SWAP(), None,
                          roomy._replace(matrix_free=int(0.55 * est.available))).mode == "blocked"


def test_nothing_within_the_margin_names_it_and_the_modes_that_fit(capsys):
    est = memory.Estimate(in_memory=10 * GiB, matrix_free=8 * GiB, available=9 * GiB, limit="the cgroup's memory limit")
    with pytest.raises(ValueError, match=r"no mode fits in memory: .* 9\.00 GiB available \(the cgroup's memory limit\)"
                                         r"; options: mode='matrix-free', fewer examples .* \(mode='auto' takes a mode "
                                         r"only where its estimate is within 75% of what is available"):
        holding.choose("auto", fixed_lr(), None, est)
    assert holding.choose("matrix-free", fixed_lr(), None, est).mode == "matrix-free"


def test_block_width_is_the_widest_within_half_then_within_the_margin(trained_mlp, prune_batch, monkeypatch):
    lay = pytree.layout(trained_mlp)
    n, p = prune_batch["x"].shape[0], lay.size
    monkeypatch.setattr(memory, "MIN_BLOCK_WIDTH", 100)
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)
    column = memory.CPU_IN_MEMORY_FACTOR * n * 4
    fixed = est.in_memory - column * p
    available = int((fixed + 400 * column) / 0.5)  # 400 columns within half
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: available)
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)
    width = -(-p // -(-p // 400))  # ⌈p/400⌉ blocks of equal width
    assert est.block_width == width and abs(est.blocked - (fixed + width * column)) <= 1
    assert est.blocked <= 0.5 * available
    available = int((fixed + 50 * column) / 0.5)  # under the minimum width within half: within 75%
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)
    widest = int((0.75 * available - fixed) // column)
    assert est.block_width == -(-p // -(-p // widest)) and 0.5 * available < est.blocked <= est.budget


class _Raises:
    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


def test_out_of_memory_in_the_gradients_names_the_mode_and_the_ways_out(trained_mlp, prune_batch, monkeypatch):
    boom = _Raises(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1600000000 bytes."))
    monkeypatch.setattr(holding, "losses_and_grads", boom)
    with pytest.raises(MemoryError, match=r"out of memory while computing the per-sample gradients with X in-memory "
                                          r"\(mode='in-memory'; estimated peak .* GiB available.*\): XLA: "
                                          r"RESOURCE_EXHAUSTED: Out of memory allocating 1600000000 bytes\.; ways out: "
                                          r"X in blocks \(mode=swapjax.Blocked\(width=444\)\), mode='matrix-free' \(estimated .* GiB\), "
                                          r"a smaller N \(fewer examples\), a smaller chunk_size") as info:
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1,
                      mode="in-memory", progress=False)
    assert boom.calls == 1 and isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)


def test_out_of_memory_in_blocks_suggests_narrower_blocks(trained_mlp, prune_batch, monkeypatch):
    monkeypatch.setattr(blocks, "solve", _Raises(MemoryError("Unable to allocate 2.98 GiB")))
    with pytest.raises(MemoryError, match=r"out of memory while solving \(LR\) with X blocked \(3 blocks of ≤ 296 "
                                          r"columns, budget: fisher\) \(mode=Blocked\(width=300.*MemoryError: Unable to "
                                          r"allocate 2\.98 GiB; ways out: narrower blocks \(mode=swapjax.Blocked\(width=148\)"
                                          r"\), mode='matrix-free' \(estimated .* GiB\), a smaller N") as info:
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1,
                      mode=swapjax.Blocked(width=300), progress=False)
    assert "mode='in-memory'" not in str(info.value)  # its peak is higher: no way out


def test_out_of_memory_matrix_free_chosen_by_auto(trained_mlp, prune_batch, monkeypatch):
    """XLA:CPU's "Error dispatching computation" (what the 10M-weight MLP gave under ulimit -v) is taken for
    running out of memory; the error says auto chose the mode."""
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, pytree.layout(trained_mlp), 128)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: est.in_memory)  # in memory over 75%
    monkeypatch.setattr(holding, "linearize", _Raises(jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation")))
    with pytest.raises(MemoryError, match=r"with X matrix-free \(chosen by mode='auto'; .*\): XLA: INTERNAL: Error "
                                          r"dispatching computation \(what XLA on a CPU raises when an allocation fails, "
                                          r"e\.g\. under ulimit -v\); ways out: a smaller N \(fewer examples\)"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1, progress=False)


@pytest.mark.parametrize("error", [jax.errors.JaxRuntimeError("INVALID_ARGUMENT: shapes differ"),
                                   ValueError("X: something else")])
def test_other_errors_pass_through_unchanged(trained_mlp, prune_batch, monkeypatch, error):
    monkeypatch.setattr(holding, "losses_and_grads", _Raises(error))
    with pytest.raises(type(error)) as info:
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1,
                      mode="in-memory", progress=False)
    assert info.value is error
