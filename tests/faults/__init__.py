"""Fault-injection tests of issue 4: real Mosquitto, the agent as a process, a real SQLite file."""
