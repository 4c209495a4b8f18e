"""crosslm: a server LLM and client SLMs that improve each other without sharing client data.

Implements CrossLM (arXiv 2312.05842) with the formulation documented in docs/algorithm.md.
"""

__version__ = "0.1.0"
