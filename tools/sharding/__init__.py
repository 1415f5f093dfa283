"""Building blocks of tools/make_shards.py: image checking, input sources, shard writing, verification."""
