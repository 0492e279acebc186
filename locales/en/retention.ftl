cart-reminder = { $first_name }, you left something in your cart: { $cart_updated_items }. It is still waiting for you.
cart-btn-checkout = Go to my cart
cart-code = Still thinking? Here is { $cart_code } for 10% off your cart — valid for 48 hours.
cart-last-call = Your cart is still saved: { $cart_updated_items }. Complete your order whenever you are ready.
viewed-reminder = Still thinking about { $product_viewed_title }? Here it is again: { $product_viewed_url }
birthday-code = Happy birthday, { $first_name }! 🎂 Your gift: code { $birthday_code } for 20% off, valid for a week.
birthday-wishes = Happy birthday, { $first_name }! 🎂 We wish you a wonderful year.
