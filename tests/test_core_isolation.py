"""The core must import with the WebUI's modules and gradio unavailable (they are host-only)."""

import subprocess
import sys
import textwrap


def test_core_imports_without_webui_modules() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "modules" or name.startswith("modules.") or name == "gradio":
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import lib_loraclr
        for info in pkgutil.walk_packages(lib_loraclr.__path__, "lib_loraclr."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
