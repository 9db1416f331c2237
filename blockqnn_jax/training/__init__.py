"""Training networks: the one engine, and what plugs into it (search candidates in memory or streamed, the final network)."""
