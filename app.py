"""FLAG-TRADER Explorer: `streamlit run app.py`. Router only: sidebar (checkpoint + assumptions) and pages."""
import streamlit as st

from flag_model import ui

st.set_page_config(page_title="FLAG-TRADER Explorer", page_icon="📈", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon="🔎", default=True),
    st.Page("pages/tensors.py", title="Tensor tree", icon="🌳"),
    st.Page("pages/architecture.py", title="Architecture check", icon="🧱"),
    st.Page("pages/lora.py", title="LoRA", icon="🧩"),
    st.Page("pages/attention.py", title="Attention", icon="👁️"),
    st.Page("pages/attributions.py", title="Attributions", icon="🧭"),
    st.Page("pages/predictions.py", title="Predictions", icon="📊"),
]

st.navigation(PAGES).run()
ui.sidebar()  # for a page that stopped before asking for the checkpoint; a no-op otherwise
