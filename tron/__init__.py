"""Tron: a hierarchical supervisor for a mesh of LLM-agent services on localhost.

The one name of Tron's that a user's own code imports is ``tron.sdk``, the public agent
SDK (see its docstring, and "Bring your own agent" in the README)::

    from tron.sdk import Agent, Task, TaskFailed
"""
