"""Flows: YAML files in ``flows/`` turned into typed specs, checked, and run as state
machines. One module per responsibility:

- ``base``: the building blocks every flow model uses (durations, RE2 patterns, names);
- ``conditions``: ``when`` conditions and the attribute semantics segments share;
- ``actions``, ``shop_actions``: each action's model and executor, declared once;
- ``spec``: the models of a flow file (states, messages, inputs, timers, triggers);
- ``graph``: where states lead (edges, reachability, the Mermaid diagram);
- ``validation``: every problem of a file, with its path and reason;
- ``loading``: reading files and folders of flows;
- ``turn``: one event's working set and the effects it records;
- ``captures``, ``payloads``: what a user sends back (typed text, button payloads);
- ``machine``: flows compiled into ``transitions`` machines (``FlowSet``).

``docs/flows.md`` documents the language.
"""
