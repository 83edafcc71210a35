"""Importing layerfuse registers the fused LLaVA classes with transformers without importing transformers."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")


def run(code: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, capture_output=True, text=True,
                   timeout=300)


def test_import_layerfuse_stays_light():
    # registering when transformers is imported later is covered by the save/load test, which loads
    # through AutoModelForImageTextToText after `import layerfuse`
    run("""
        import sys
        import layerfuse
        assert "transformers" not in sys.modules
    """)


def test_import_layerfuse_after_transformers_registers_at_once():
    run("""
        from transformers import CONFIG_MAPPING, AutoModelForImageTextToText
        import layerfuse
        from layerfuse.integrations.transformers import LayerfuseLlavaConfig, LayerfuseLlavaForConditionalGeneration
        assert CONFIG_MAPPING["layerfuse_llava"] is LayerfuseLlavaConfig
        assert AutoModelForImageTextToText._model_mapping[LayerfuseLlavaConfig] is LayerfuseLlavaForConditionalGeneration
    """)
