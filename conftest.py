"""pytest option --wkv-impl: put any WKV-7 kernel through the WKV property suite of the tests.

    python -m pytest test_ref.py --wkv-impl package.module:function

The function must have wkv_kernel's signature, f(r, w, k, v, a, b, state) -> (y, S_T). The suite's
tests (those that take the `kernel` argument) then run on it alone, and every other test is
deselected. Without the option the suite runs on the project's own forms.
"""


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
