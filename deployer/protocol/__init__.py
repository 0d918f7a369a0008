"""The controller's side of the agent protocol: the session and its replies, and the bundle that ships
`deployer.remote` to a board.
"""
