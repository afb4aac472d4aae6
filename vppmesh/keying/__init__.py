"""Which key each SA gets: the key generations (epochs.py), the SA keys of agreed
generations (book.py), what VPP's SAs say about them (observe.py), what a pair's
secrecy is (pairs.py), and the agreement with the peers' agents behind one interface
(agreement.py): the agents' channel for a long-running agent (channel_agreement.py),
none for a one-shot `up`. Nothing here touches a socket: the channel's I/O is
secrecy.py's.
"""
