"""Agents: the ReAct text protocol and student agents, teacher trajectory collection, and fine-tuning
data export."""
