"""The paper's LLM-in-the-loop data tools: instruction data written by a text-only LLM from captions and boxes
(``generate``, prompts per kind in ``kinds`` and ``prompts/``, inputs in ``sources``, resumable through
``journal``), stage-1 caption data (``captions``), and the LLM client that also serves the judge (``llm``).
See docs/DATA.md."""
