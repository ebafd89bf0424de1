"""smoothserve's HTTP front end (OpenAI-style completions). Built on top of `engine`."""
