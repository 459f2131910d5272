"""pytest set-up of test_ref.py: the environment the tests run in, and the option --wkv-impl.

Environment. The Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) unless
HRWKV7_TEST_CUDA=1 (then on the GPU, and the GPU-only tests run too). Triton reads the variable
when wkv_kernel defines its kernels, i.e. when wkv_kernel is first imported; pytest imports this
file before any test module, so it is set here, before anything imports wkv_kernel. Subprocesses
the tests start (and the notebooks' kernels) inherit it.

--wkv-impl: put any WKV-7 kernel through the WKV property suite of the tests.

    python -m pytest -q test_ref.py --wkv-impl package.module:function
    python -m pytest -q test_ref.py --wkv-impl fla_adapter:fla_dplr_recurrence   (fla-core's reference)

The function must have wkv_kernel's signature, f(r, w, k, v, a, b, state) -> (y, S_T). The suite's
tests (those that take the `kernel` argument) then run on it alone, and every other test is
deselected. Without the option the suite runs on the project's own forms.
"""
import os

WANT_CUDA = os.environ.get("HRWKV7_TEST_CUDA") == "1"
if not WANT_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--wkv-impl", metavar="package.module:function", default=None,
                     help="run only the WKV kernel suite, on this function f(r, w, k, v, a, b, state) -> (y, S_T)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--wkv-impl") is None:
        return
    suite = [item for item in items if "kernel" in getattr(item, "fixturenames", ())]
    others = [item for item in items if "kernel" not in getattr(item, "fixturenames", ())]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = suite
