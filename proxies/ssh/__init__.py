"""The SSH gateway: exec requests held for approval, shells recorded (see gateway.py).

Importing the package must not load asyncssh or the event loop: the launcher imports
``proxies.ssh.register`` in every process.
"""
