"""nanoserve: a readable NumPy LLM inference engine that really serves.

    from nanoserve import LLM, SamplingParams
    llm = LLM()                                      # SmolLM2-135M-Instruct
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    print(out[0].text)
"""

from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.llm import LLM
from nanoserve.output import RequestOutput
from nanoserve.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
