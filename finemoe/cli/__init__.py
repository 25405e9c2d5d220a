"""The `finemoe` command line: thin click commands over the library."""
