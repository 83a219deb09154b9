"""jupyter_kernel_test's conformance suite against the installed kernelspec,
once on a fresh kernel and once after a swap to a fresh worker."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import jupyter_kernel_test as jkt
import pytest

from conftest import wait_no_processes

pytestmark = pytest.mark.shared_kernel


@pytest.fixture(scope="module", autouse=True)
def installed(kernelspec_prefix: Path) -> Iterator[None]:
    yield
    assert wait_no_processes() == [], "a kernel of the conformance suite was left running"


class ForkreloadKernelTests(jkt.KernelTests):
    kernel_name = "forkreload"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))", "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    # As for ipykernel itself: its answer to a "range" request for the
    # current session names session 0, not the number "tail" gave.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


class ForkreloadKernelAfterSwapTests(ForkreloadKernelTests):
    """The same suite, run against the worker that replaced the first one."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        try:
            cls._swap()
        except BaseException:
            cls.tearDownClass()  # unittest skips it when setUpClass fails
            raise

    @classmethod
    def _swap(cls) -> None:
        import tempfile

        cls.tmp = Path(tempfile.mkdtemp())
        mod = cls.tmp / "swapme.py"
        mod.write_text("V = 1\n")
        reply = cls.kc.execute_interactive(f"import sys; sys.path.append({str(cls.tmp)!r}); import swapme; kept = 41", timeout=30)
        assert reply["content"]["status"] == "ok"
        time.sleep(0.01)
        mod.write_text(textwrap.dedent("V = 2\n"))
        outputs: list[str] = []
        reply = cls.kc.execute_interactive(
            "print(swapme.V + kept)", timeout=120, output_hook=lambda m: outputs.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok"
        assert "43\n" in outputs and any("fresh worker" in o for o in outputs), outputs


class ForkreloadIopubWelcomeTests(jkt.IopubWelcomeTests):
    kernel_name = "forkreload"
    support_iopub_welcome = True
