"""The Streamlit dashboard; it reads the control-plane API only (dashboard/client.py)."""
