"""`evaluate`: does the SLM replace the LLM, task by task?"""
