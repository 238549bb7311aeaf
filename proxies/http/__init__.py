"""The HTTP gateway: a reverse proxy per connection, each request judged (see gateway.py).

Importing the package must not load aiohttp or the event loop: the launcher imports
``proxies.http.register`` in every process.
"""
