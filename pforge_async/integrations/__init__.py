"""Adapters that let agent frameworks persist through pforge_async, each a one-line switch:

- :mod:`pforge_async.integrations.langgraph`: ``PforgeSaver``, a LangGraph checkpointer
  (``pip install 'pforge_async[langgraph]'``).
- :mod:`pforge_async.integrations.openai_agents`: ``PforgeSession``, an OpenAI Agents SDK session
  (``pip install 'pforge_async[openai-agents]'``).

Each imports its framework, so this package imports none of them: import the module you use.
"""

from __future__ import annotations

__all__: list[str] = []
