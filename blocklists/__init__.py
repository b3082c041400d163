"""Blocklists: list formats, normalising, the trie compiler and the matcher. No network, no asyncio."""
