"""The Hugging Face bridge: ``export`` / ``export_run`` write a normlab model as a transformers
model (a stock Llama / Qwen3 / OLMo-2 / OLMoE class where one is exact, else bundled custom
code); ``from_hf`` / ``import_run`` read Llama, Qwen3, OLMo-2 and OLMoE models back. transformers is imported
only inside the functions that need it (``pip install 'normlab[hf]'``)."""

from normlab.hf.export import export, export_run, stock_family
from normlab.hf.imports import from_hf, import_run, model_config_from_hf

__all__ = ["export", "export_run", "from_hf", "import_run", "model_config_from_hf",
           "stock_family"]
