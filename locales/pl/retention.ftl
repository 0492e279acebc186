cart-reminder = { $first_name }, w Twoim koszyku zostało: { $cart_updated_items }. Wciąż na Ciebie czeka.
cart-btn-checkout = Przejdź do koszyka
cart-code = Wciąż się zastanawiasz? Oto kod { $cart_code } na 10% zniżki na koszyk — ważny 48 godzin.
cart-last-call = Twój koszyk jest zapisany: { $cart_updated_items }. Złóż zamówienie, kiedy zechcesz.
viewed-reminder = Wciąż myślisz o { $product_viewed_title }? Oto on: { $product_viewed_url }
birthday-code = Wszystkiego najlepszego, { $first_name }! 🎂 Prezent: kod { $birthday_code } na 20% zniżki, ważny tydzień.
birthday-wishes = Wszystkiego najlepszego, { $first_name }! 🎂 Życzymy wspaniałego roku.
